"""Run dirs that survive crashes: resume from the newest complete checkpoint, never overwrite a finished
run, stop cleanly on SIGTERM / Ctrl-C, and stop on a non-finite loss instead of training on garbage."""

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from data_prep.io import write_text
from dpo_recipes import config, health
from dpo_recipes.config import ConfigError

CHECKPOINT = "checkpoint-"
RECORD = ".hydra"  # Hydra's record of the launch that started the run: its config and overrides
HYDRA_FILES = {f"{RECORD}/{name}" for name in ("config.yaml", "hydra.yaml", "overrides.yaml")}


class Stopped(RuntimeError):
    """Training stopped early (a signal, a non-finite loss); the message says what to do next."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def finished(run_dir: Path) -> bool:
    summary = run_dir / "dpo_metrics" / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "finished"


def complete(checkpoint: Path) -> bool:
    """A checkpoint is complete once the Trainer wrote trainer_state.json, its last file."""
    try:
        return "global_step" in json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False


def checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob(f"{CHECKPOINT}*") if p.is_dir() and p.name[len(CHECKPOINT) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT) :]))


def guard(run_dir: Path, run: DictConfig, before_record: bool = False) -> None:
    """Refuse to touch a dir that holds a finished run (unless overwrite) or any run (resume=never).
    An overwritten run's record goes too."""
    another = "pick another name (RUN=...)"
    if finished(run_dir):
        if not run.overwrite:
            raise ConfigError(
                [f"{run_dir} already holds a finished run; {another} or pass run.overwrite=true"]
            )
        # Hydra wrote this launch's record over the replaced run's in .hydra/, unless it has not yet.
        record = run_dir / RECORD if before_record else run_dir / RECORD / "relaunched"
        for old in [*checkpoints(run_dir), run_dir / "dpo_metrics", record]:
            shutil.rmtree(old, ignore_errors=True)
    elif run.resume == "never" and (checkpoints(run_dir) or (run_dir / "dpo_metrics").exists()):
        raise ConfigError([f"{run_dir} holds an earlier run and run.resume=never; {another}"])


def record_dir(run_dir: str, overwrite: bool = False) -> str | None:
    """Where Hydra records this launch (`hydra.output_subdir`): `.hydra` for a new run or one that replaces
    a finished run; beside the first record for a relaunch, so the record of how the run started is
    never replaced; nowhere for a finished run kept (a re-run sweep skips it without writing into it)."""
    if finished(Path(run_dir)):
        return RECORD if overwrite else None
    if (Path(run_dir) / RECORD / "config.yaml").exists():
        return f"{RECORD}/relaunched/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    return RECORD


OmegaConf.register_new_resolver("dpo_record", record_dir, replace=True)


LAUNCH_ONLY = ("run.resume", "run.overwrite", "run.allow_changes")  # how that launch ran, not the run


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _leaves(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def changes(first: dict, now: dict) -> list[str]:
    """What `now` trains differently from `first` (two composed configs, unresolved): every leaf but
    `run.*` and the logger, which steer the launch and not what is trained."""
    old, new = _leaves(first), _leaves(now)
    keys = [k for k in {**old, **new} if not k.startswith(("run.", "logger."))]
    missing = "(unset)"
    return [f"{k}: {old.get(k, missing)} -> {new.get(k, missing)}" for k in keys if old.get(k) != new.get(k)]


def relaunch(overrides: list[str]) -> list[str]:
    """The overrides that continue the unfinished run a launch points at (run.name or hydra.run.dir):
    the ones it started with, this launch's on top. An override that changes what it trains is refused
    with the differences, unless run.allow_changes=true; then they are recorded in the run dir."""
    if any(o.startswith("-") for o in overrides) or not any(
        _key(o) in ("run.name", "hydra.run.dir") for o in overrides
    ):
        return overrides  # a multirun or a new dir named by the launch time: nothing to continue
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    run_dir, record = Path(cfg.hydra.run.dir), Path(cfg.hydra.run.dir) / RECORD
    started = checkpoints(run_dir) or (run_dir / "dpo_metrics").exists()
    resumable = started and not finished(run_dir) and cfg.run.resume != "never"
    if not resumable or not (record / "overrides.yaml").exists():
        return overrides
    recorded = yaml.safe_load((record / "overrides.yaml").read_text()) or []
    first = [o for o in recorded if _key(o) not in LAUNCH_ONLY]
    now = {_key(o): o for o in overrides}
    merged = [now.pop(_key(o), o) for o in first] + list(now.values())
    resumed, _ = config.compose(merged)
    started_with = yaml.safe_load((record / "config.yaml").read_text())
    differences = changes(started_with, OmegaConf.to_container(resumed))
    if differences and not resumed.run.allow_changes:
        kept = " ".join(o.removeprefix("++") for o in first)
        raise ConfigError(
            [
                f"{run_dir} holds an unfinished run; resuming it with these overrides would change what it "
                f"trains: {'; '.join(differences)}. Resume without them (its own overrides are kept: {kept}), "
                "pass run.allow_changes=true to resume with the changes recorded, or pick another name (RUN=...)"
            ]
        )
    if differences:
        record_file = run_dir / f"changes_{time.strftime('%Y-%m-%d_%H-%M-%S')}.yaml"
        write_text(
            record_file, yaml.safe_dump({"overrides": merged, "changes": differences}, sort_keys=False)
        )
        print(f"resuming {run_dir} with run.allow_changes=true; the changes are in {record_file}")
    return merged


def discard_unstarted(run_dir: Path) -> None:
    """A launch that failed before training leaves nothing behind: remove a run dir that holds only the
    record Hydra wrote for it."""
    files = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    if run_dir.is_dir() and files <= HYDRA_FILES:
        shutil.rmtree(run_dir)


def resume_point(run_dir: Path, run: DictConfig) -> str | None:
    """The checkpoint to resume from: `run.resume` itself, or the newest complete one in the run dir."""
    if run.resume == "never":
        return None
    if run.resume != "auto":
        return str(run.resume)
    for checkpoint in reversed(checkpoints(run_dir)):
        if complete(checkpoint):
            print(f"resuming from {checkpoint}")
            return str(checkpoint)
        print(f"skipping {checkpoint}: incomplete (the run stopped while writing it)", file=sys.stderr)
    return None


class RunGuard(Callback):
    """Hydra callback: check the run dir before Hydra writes its .hydra/ files into it."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)
        try:
            guard(Path(config.hydra.run.dir), config.run, before_record=True)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


def finish(
    trainer, metrics, on_signal: "StopOnSignal", on_non_finite: "StopOnNonFinite", recipe: str
) -> None:
    """After training: print the health flags, then save the model and a finished summary, or write the
    summary of a stopped run and raise Stopped with what to do next."""
    flags = health.check(trainer.state.log_history)
    for flag in flags:
        print(f"health: {flag['flag']}: {flag['problem']}; try: {flag['fix']}", file=sys.stderr)
    if on_signal.received is None and not on_non_finite.error:
        trainer.save_model(trainer.args.output_dir)
        metrics.write_summary(trainer.state, "finished", health=flags)
        return
    status = "interrupted" if on_signal.received is not None else "stopped: non-finite"
    metrics.write_summary(trainer.state, status, health=flags)
    if on_non_finite.error:
        raise Stopped(on_non_finite.error)
    run_dir = Path(trainer.args.output_dir)
    hint = f'make train RECIPE={recipe} RUN={run_dir.name}  (or ARGS="hydra.run.dir={run_dir}")'
    raise Stopped(
        f"{signal.Signals(on_signal.received).name} at step {trainer.state.global_step}: checkpoint saved; "
        f"resume with {hint}",
        128 + on_signal.received,
    )


def exit_code(err: Exception) -> int | None:
    """The exit code for an error whose message tells the user what to do, or None for a bug."""
    from dpo_recipes.data import DataError
    from dpo_recipes.hub import Unreachable

    if isinstance(err, Stopped):
        return err.exit_code
    return 2 if isinstance(err, ConfigError | DataError | Unreachable) else None


class StopOnSignal(TrainerCallback):
    """SIGTERM or Ctrl-C: finish the current step, save a checkpoint, then stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:  # a second one: stop now, whatever is being written
            print(
                f"\nsecond {name}: stopping now; a checkpoint being written may be incomplete, and resuming "
                "uses the newest complete one",
                file=sys.stderr,
            )
            os._exit(128 + signum)
        self.received = signum
        print(
            f"\n{name}: saving a checkpoint after this step, then stopping ({name} again: stop now)",
            file=sys.stderr,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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
