"""Run a training entry point and time it from process start: python -m benchmarks.timed OUT.json MODULE|SCRIPT ARGS...

Wraps transformers' Trainer.training_step to note when each optimizer step's last micro-batch ends
(the optimizer's update then counts towards the next step); writes the time to
the first step, the per-step times, the loss, grad-norm and token-count trajectories and the peak RSS
and GPU memory to OUT.json.
"""

import time

START = time.perf_counter()

import json  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

from dpo_recipes.training.metrics import peak_rss_mb  # noqa: E402

ends: dict[int, float] = {}  # optimizer step -> when its last micro-batch ended
original = transformers.Trainer.training_step


def training_step(self, *args, **kwargs):
    loss = original(self, *args, **kwargs)
    ends[self.state.global_step] = time.perf_counter() - START
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
        "first_step_s": min(ends.values()),
        "step_s": [b - a for a, b in zip(list(ends.values()), list(ends.values())[1:], strict=False)],
        "total_s": time.perf_counter() - START,
        "loss": [e["loss"] for e in history if "loss" in e],
        "grad_norm": [e["grad_norm"] for e in history if "grad_norm" in e],
        "peak_rss_mb": peak_rss_mb(),
        "num_tokens": [e["num_tokens"] for e in history if "num_tokens" in e and "loss" in e],
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    timed()
