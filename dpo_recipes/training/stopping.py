"""How a run ends: saved and finished, or stopped by a signal (every rank at the same step, with a
checkpoint) or by a non-finite loss, with what to do next. What a launch does with its run dir is
rundir/'s."""

import math
import os
import signal
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from dpo_recipes.errors import LAUNCHED, Stopped
from dpo_recipes.rundir import paths
from dpo_recipes.training import health, verdict


def launched_with() -> str:
    """The make variables this launch ran with beyond RECIPE and RUN (HARDWARE, NPROC, NNODES), set by
    `python -m dpo_recipes.launch` for its processes: a relaunch needs them to train the same run."""
    return os.environ.get(LAUNCHED, "")


def hint(recipe: str, run_dir: Path) -> str:
    how = " ".join(filter(None, [f"RECIPE={recipe}", f"RUN={run_dir.name}", launched_with()]))
    return f'make train {how}  (or ARGS="hydra.run.dir={run_dir}")'


def save(trainer) -> list[str]:
    """Save the final weights and tokenizer, gathered whole on the first process under FSDP (a sharded
    state dict is not a model); returns what is still missing on disk (first process only)."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(trainer.args.output_dir)
    return paths.missing_weights(Path(trainer.args.output_dir)) if trainer.is_world_process_zero() else []


def finish(
    trainer, metrics, on_signal: "StopOnSignal", on_non_finite: "StopOnNonFinite", recipe: str, **summary
) -> None:
    """After training: print the health flags, then save the model and a finished summary, or write the
    summary of a stopped run and raise Stopped with what to do next. A signal during the final save
    lets the save finish: the handlers stay until the end. `summary`: what else summary.json records."""
    try:
        flags = health.check(trainer.state.log_history)
        for flag in flags:
            print(f"health: {flag['flag']}: {flag['problem']}; try: {flag['fix']}", file=sys.stderr)
        received = on_signal.received
        run_dir = Path(trainer.args.output_dir)
        if received is None and not on_non_finite.error:
            missing = save(trainer)
            status = (
                f"incomplete: {' and '.join(missing)} missing after the final save" if missing else "finished"
            )
            written = metrics.write_summary(trainer.state, status, health=flags, **summary)
            if trainer.is_world_process_zero():
                verdict.show(written, run_dir)
            if missing:
                raise Stopped(f"{run_dir}: training ended, but {status}; the checkpoints are kept")
            return
        status = "interrupted" if received is not None else "stopped: non-finite"
        name = signal.Signals(received).name if received is not None else None
        written = metrics.write_summary(trainer.state, status, health=flags, signal=name, **summary)
        if trainer.is_world_process_zero():
            verdict.show(written, run_dir, None if on_non_finite.error else hint(recipe, run_dir))
        if on_non_finite.error:
            raise Stopped(on_non_finite.error)
        raise Stopped(
            f"{name} at step {trainer.state.global_step}: checkpoint saved; resume with {hint(recipe, run_dir)}",
            128 + received,
        )
    finally:
        on_signal.restore()


def failed(trainer, metrics, err: Exception, recipe: str) -> None:
    """Training raised: summary.json says so, and the verdict block says what is kept and how to resume
    from the newest checkpoint where there is one."""
    if trainer.is_world_process_zero():
        run_dir = Path(trainer.args.output_dir)
        written = metrics.write_summary(trainer.state, f"failed: {type(err).__name__}: {err}"[:500])
        verdict.show(written, run_dir, hint(recipe, run_dir) if paths.checkpoints(run_dir) else None)


class StopOnSignal(TrainerCallback):
    """SIGTERM or Ctrl-C: finish the current step, save a checkpoint, then stop. With several processes,
    every rank stops at the same step boundary: at each step's end they agree on whether any of them
    received a signal. The same signal again within FORWARDED_WITHIN seconds is one signal reaching the
    process twice (from the terminal and from a launcher passing it on), not a second Ctrl-C."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    FORWARDED_WITHIN = 3.0

    def __init__(self):
        self.received: int | None = None
        self._at = 0.0
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            if time.monotonic() - self._at < self.FORWARDED_WITHIN:
                return
            print(  # a second one: stop now, whatever is being written
                f"\nsecond {name}: stopping now; a checkpoint being written may be incomplete, and resuming "
                "uses the newest complete one",
                file=sys.stderr,
            )
            os._exit(128 + signum)
        self.received, self._at = signum, time.monotonic()
        print(
            f"\n{name}: saving a checkpoint after this step, then stopping ({name} again: stop now)",
            file=sys.stderr,
        )

    def agreed(self, device) -> int | None:
        """The signal any rank received (the highest number if several), on every rank."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.received
        flag = torch.tensor([self.received or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        received = self.agreed(args.device)
        if received is not None:
            self.received = self.received or received
            control.should_save = True
            control.should_training_stop = True

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class StopOnNonFinite(TrainerCallback):
    """A loss or grad norm that is NaN or infinite stops the run after `patience` such logged steps."""

    def __init__(self, patience: int = 0):
        self.patience, self.bad, self.error = patience, 0, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {k: (logs or {}).get(k) for k in ("loss", "grad_norm")}
        broken = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
        if not broken:
            return
        self.bad += 1
        if self.bad > self.patience:
            what = ", ".join(f"{k} = {v}" for k, v in broken.items())
            self.error = (
                f"{what} at step {state.global_step}: training stopped, metrics written. Lower "
                "train.learning_rate, keep train.max_grad_norm set, or check the data; run.nan_patience "
                "tolerates a few such steps"
            )
            control.should_training_stop = True
