"""The run's real peak memory, measured beside the prediction: the same tracker on CPU over the first two
optimizer steps, torch.cuda's counter on GPU."""

import torch
from transformers import TrainerCallback

from dpo_recipes.memory.trace import MB, Tracker


class Measured(TrainerCallback):
    """The run's real peak, for summary.json's "memory" beside the prediction: on CUDA
    torch.cuda's counter over the run; on CPU the Tracker over the run's first two optimizer steps (the
    second with the optimizer states), which is where a step's peak is; a resumed run is not measured. Sharded engines keep
    their weights in forms the tracker does not follow: not measured on CPU."""

    STEPS = 2

    def __init__(self, trainer, engine: str):
        self.trainer, self.tracker, self.until, self.engine = trainer, None, None, engine
        self.found: dict = {}  # measured_peak_mb and measured_by, once measured

    def on_step_begin(self, args, state, control, **kwargs):
        fresh = state.global_step == 0  # a resumed run's steps are not its first
        if self.until is None and fresh and args.device.type == "cpu" and self.engine in ("single", "ddp"):
            trainer, self.until = self.trainer, state.global_step + self.STEPS
            reference = getattr(trainer, "ref_model", None)  # ORPO and CPO hold none
            self.tracker = Tracker().watch(trainer.model, reference, optimizer=trainer.optimizer)
            self.tracker.__enter__()

    def close(self):
        """Stop tracking (also when training ended early or failed), recording what was measured."""
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.__exit__(None, None, None)
            self.found["measured_peak_mb"] = round(tracker.peak().get("Total", 0) / MB, 1)
            self.found["measured_by"] = f"MemTracker, steps 1-{self.STEPS}"

    def on_step_end(self, args, state, control, **kwargs):
        if self.until is not None and state.global_step >= self.until:
            self.close()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        if args.device.type == "cuda":
            self.found["measured_peak_mb"] = round(torch.cuda.max_memory_allocated(args.device) / MB, 1)
            self.found["measured_by"] = "torch.cuda.max_memory_allocated"
