"""Run a training entry point and time it from process start: python -m benchmarks.timed OUT.json MODULE|SCRIPT ARGS...

Wraps transformers' Trainer.training_step to note when each optimizer step ends; writes the time to
the first step, the per-step times, the loss and grad-norm trajectory and the peak RSS to OUT.json.
"""

import time

START = time.perf_counter()

import json  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402

import transformers  # noqa: E402

from data_prep.io import peak_rss_mb  # noqa: E402

ends: list[float] = []
original = transformers.Trainer.training_step


def training_step(self, *args, **kwargs):
    loss = original(self, *args, **kwargs)
    ends.append(time.perf_counter() - START)
    timed.trainer = self
    return loss


def timed():
    out, target, *argv = sys.argv[1:]
    transformers.Trainer.training_step = training_step
    sys.argv = [target, *argv]
    try:
        if target.endswith(".py"):
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        if done.code:
            raise
    history = timed.trainer.state.log_history
    result = {
        "first_step_s": ends[0],
        "step_s": [b - a for a, b in zip(ends, ends[1:], strict=False)],
        "total_s": time.perf_counter() - START,
        "loss": [e["loss"] for e in history if "loss" in e],
        "grad_norm": [e["grad_norm"] for e in history if "grad_norm" in e],
        "peak_rss_mb": peak_rss_mb(),
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    timed()
