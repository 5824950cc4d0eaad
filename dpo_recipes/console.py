"""What a run prints: one progress bar for training with the numbers that matter at each log (the raw
dicts are in dpo_metrics/log_history.json and the CSV), and the third-party warnings known to be
harmless filtered where they arise, each with why. DPO_RECIPES_VERBOSE=1 (`make train VERBOSE=1`)
shows everything as the libraries print it."""

import contextlib
import logging
import os
import warnings

from transformers.trainer_callback import ProgressCallback
from transformers.utils import logging as hf_logging

VERBOSE = "DPO_RECIPES_VERBOSE"

# Python warnings: (category, message, the module that issues it, why it is harmless)
WARNINGS = [
    (
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
        r"transformers\.modeling_utils",
        "transformers renamed the attribute and TRL and PEFT still read the old name; no setting of a recipe",
    ),
    (
        UserWarning,
        r"The module hierarchy tracking maybe be messed up",
        r"torch\.distributed\._tools\.mod_tracker",
        "raised by the peak-memory measurement (torch's MemTracker) under activation checkpointing and "
        "PEFT's wrappers; it doubts the per-module labels, and the measurement reads the total only",
    ),
    (
        FutureWarning,
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        r"",
        "DeepSpeed 0.19 calls collectives torch renamed: one a collective (hundreds a step under ZeRO-3), "
        "about a name DeepSpeed will change, never about the run",
    ),
]
# Log records: (logger, message start, why it is harmless)
RECORDS = [
    (
        "DeepSpeed",
        "Setting accelerator to CPU",
        "DeepSpeed says so at import on any machine without a GPU; the device a run used is in its summary",
    ),
]


def verbose() -> bool:
    return os.environ.get(VERBOSE, "") not in ("", "0")


def quiet() -> None:
    """Filter the known harmless warnings, unless DPO_RECIPES_VERBOSE asks for everything."""
    if verbose():
        return
    for category, message, module, _ in WARNINGS:
        warnings.filterwarnings("ignore", message, category, module)
    for name, start, _ in RECORDS:
        logger = logging.getLogger(name)
        if not any(getattr(f, "start", None) == start for f in logger.filters):  # once per process
            logger.addFilter(Dropped(start))


class Dropped(logging.Filter):
    """Drops the log records whose message starts with `start`."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


@contextlib.contextmanager
def loading_quietly():
    """transformers' load report off for a load whose missing keys are expected (a new score head)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class Progress(ProgressCallback):
    """The training bar, with the latest loss, eval accuracy and margin and learning rate beside it, in
    place of a printed dict at each log and a bar at each evaluation."""

    SHOWN = {
        "loss": "loss",
        "eval_rewards/accuracies": "eval acc",
        "eval_accuracy": "eval acc",  # a reward model's
        "eval_rewards/margins": "margin",
        "eval_margin": "margin",
        "learning_rate": "lr",
    }

    def __init__(self):
        super().__init__()
        self.numbers: dict[str, str] = {}

    def on_prediction_step(self, args, state, control, **kwargs):
        pass

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None:
            return
        for key, short in self.SHOWN.items():
            if isinstance(value := (logs or {}).get(key), int | float):
                self.numbers[short] = f"{value:.3g}"
        self.training_bar.set_postfix(self.numbers, refresh=True)


def use(trainer) -> None:
    """The trainer's progress bar as `Progress` draws it (unless verbose or the bar is off)."""
    if not verbose() and not trainer.args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(Progress())
