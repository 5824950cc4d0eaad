"""Export every run's metrics to `<run dir>/dpo_metrics/`: CSV, curves, summary and the raw log history.

The CSV and JSON files are rewritten atomically on every log, so a crash keeps everything logged so far.
The PNG takes a second or two to draw, so during training it is redrawn at an evaluation only once
PLOT_EVERY_S seconds have passed since the last drawing, and always at the end. Only the main process
writes.
"""

import csv
import io
import json
import math
import os
import re
import resource
import textwrap
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from data_prep.io import atomic_path, write_text
from dpo_recipes.rundir import paths

PLOT_EVERY_S = 120.0
# Every metric the CSV, the plot, the summary and the sweep report name: (TRL's name, True when higher
# is better or None when no value is best, the plot panel it is drawn in). Train and eval (`eval_`
# prefix) share a row; a new row with a new panel title adds a panel to the plot.
METRICS = [
    ("loss", False, "loss"),
    ("rewards/accuracies", True, "rewards/accuracies"),
    ("rewards/margins", True, "rewards/margins"),
    ("rewards/chosen", None, "rewards: chosen vs rejected"),
    ("rewards/rejected", None, "rewards: chosen vs rejected"),
    ("logps/chosen", None, "log-probs: chosen vs rejected"),
    ("logps/rejected", None, "log-probs: chosen vs rejected"),
    ("learning_rate", None, "learning rate"),
    # precision.UpdateProbe: the share of sampled non-zero updates that rounding left unstored
    ("updates/lost", False, "updates lost to rounding"),
    # task=reward (TRL's RewardTrainer): the share of pairs ranked right, the mean score margin
    ("accuracy", True, "reward model: accuracy"),
    ("margin", True, "reward model: chosen - rejected score"),
    # task=sft (TRL's SFTTrainer): the share of answer tokens the model predicts as its top token
    ("mean_token_accuracy", True, "SFT: answer token accuracy"),
    # task=kto (TRL's KTOTrainer): its estimate of the policy's KL divergence from the reference
    ("kl", None, "KTO: KL estimate"),
    # judge.every: policy vs reference answers on held-out prompts (eval only), with its 95% interval
    ("judge/win_rate", True, "judge: win rate vs reference"),
    ("judge/win_rate_low", None, "judge: win rate vs reference"),
    ("judge/win_rate_high", None, "judge: win rate vs reference"),
]
PANELS = {panel: [name for name, _, p in METRICS if p == panel] for _, _, panel in METRICS}
BEST = {
    prefix + name: higher for prefix in ("", "eval_") for name, higher, _ in METRICS if higher is not None
}


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec, unlike ru_maxrss, which
    keeps the peak of the process that forked this one."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_rows(log_history: list[dict]) -> list[dict]:
    """One row per logged step, its train and eval entries merged; the trainer's closing totals
    (train_runtime, ...) go to the summary."""
    steps = {}
    for entry in log_history:
        if "train_runtime" not in entry:
            steps.setdefault(entry.get("step"), {}).update(entry)
    return list(steps.values())


def to_csv(rows: list[dict], first: tuple[str, ...] = ("step", "epoch")) -> str:
    columns = list(first)
    for row in rows:
        columns += [key for key in row if key not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def summarize(log_history: list[dict]) -> dict:
    """Final value of every metric, and the best of the main ones with the step it was reached at."""
    rows = step_rows(log_history)
    final, best = {}, {}
    for row in rows:
        for key, value in row.items():
            if key in ("step", "epoch") or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            final[key] = value
            if key in BEST:
                higher = BEST[key]
                if key not in best or (value > best[key]["value"] if higher else value < best[key]["value"]):
                    best[key] = {"value": value, "step": row.get("step")}
    totals = next((e for e in reversed(log_history) if "train_runtime" in e), {})
    return {"final": final, "best": best, "totals": totals}


def tokens_per_second(log_history: list[dict], steps: int, runtime: float | None) -> float | None:
    """Training tokens a second: TRL's `num_tokens` (non-padding tokens of prompts and both answers,
    counted since this process started training) at its last log, scaled to the steps run after it."""
    logged = [e for e in log_history if "num_tokens" in e and "step" in e]
    if not logged or not runtime or not logged[-1]["step"]:
        return None
    last = logged[-1]
    return round(last["num_tokens"] * steps / last["step"] / runtime, 1)


def describe(device: torch.device) -> str:
    """The device in a few words, for the summary and the plot's title."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type.upper()} ({os.cpu_count()} cores)" if device.type == "cpu" else device.type


def _compared(row: dict, prefix: str, metric: str) -> bool:
    """False for a train accuracy logged before any pair was told apart: at the first step the policy
    is the reference, every margin is 0 and the accuracy a meaningless 0."""
    return not (metric == "rewards/accuracies" and not prefix and row.get("rewards/margins") == 0)


def figure(rows: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = {key for row in rows for key in row}
    panels = {  # the panels of what the run logs (DPO's, a reward model's, the judge's); all before a log
        panel: metrics
        for panel, metrics in PANELS.items()
        if not logged - {"step", "epoch"} or any(p + m in logged for m in metrics for p in ("", "eval_"))
    }
    rows_of_panels = -(-len(panels) // 3)
    fig, axes = plt.subplots(rows_of_panels, 3, figsize=(15, 4 * rows_of_panels), constrained_layout=True)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (panel, metrics) in zip(axes.flat, panels.items(), strict=False):
        for metric in metrics:
            for prefix, style in (("", "-"), ("eval_", "o--")):
                points = [
                    (r["step"], r[prefix + metric])
                    for r in rows
                    if prefix + metric in r and _compared(r, prefix, metric)
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, style, label=f"{'eval' if prefix else 'train'} {metric}", markersize=4)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.split(":")[0])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.fill(line, 160) for line in title.splitlines()))
    return fig


def plot(rows: list[dict], target: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = figure(rows, title)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def title(context: dict, device: str) -> str:
    """The recipe, the run's name and its overrides, and the device: a plot says which run it is."""
    overrides = " ".join(o.removeprefix("++") for o in context.get("overrides", []))
    run = Path(context.get("run_dir", "")).name
    return f"{context.get('recipe', '')} / {run} on {device}" + (f"\n{overrides}" if overrides else "")


class MetricsCallback(TrainerCallback):
    """Writes training_metrics.csv, log_history.json, training_curves.png and summary.json."""

    def __init__(self, out_dir: Path, context: dict):
        self.out_dir = Path(out_dir)
        self.context = context  # recipe, resolved config, dataset sizes, versions, commit
        self.device = None
        self.drawn_at = time.monotonic()  # the first drawing waits PLOT_EVERY_S too

    def on_train_begin(self, args, state, control, **kwargs):
        self.device = args.device

    def _tables(self, state) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.out_dir / paths.HISTORY, json.dumps(state.log_history, indent=2))
        write_text(self.out_dir / paths.CSV, to_csv(step_rows(state.log_history)))

    def _plot(self, state) -> None:
        device = describe(self.device) if self.device else "?"
        plot(step_rows(state.log_history), self.out_dir / paths.CURVES, title(self.context, device))
        self.drawn_at = time.monotonic()

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._tables(state)

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero and time.monotonic() - self.drawn_at >= PLOT_EVERY_S:
            self._plot(state)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._tables(state)
            self._plot(state)

    def write_summary(self, state, status: str, **extra) -> dict:
        """summary.json, once the run has ended: `status` is finished, interrupted or stopped."""
        summary = summarize(state.log_history)
        totals = summary.pop("totals")
        summary = {
            "recipe": self.context.get("recipe"),
            "status": status,
            "steps": state.global_step,
            "epochs": state.epoch,
            "runtime_s": totals.get("train_runtime"),
            "samples_per_second": totals.get("train_samples_per_second"),
            "tokens_per_second": tokens_per_second(
                state.log_history, state.global_step, totals.get("train_runtime")
            ),
            "device": describe(self.device) if self.device else None,
            "peak_rss_mb": round(peak_rss_mb()),
            **summary,
            **extra,
            **{k: v for k, v in self.context.items() if k != "recipe"},
        }
        if self.device is not None and self.device.type == "cuda":
            summary["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        if state.is_world_process_zero:
            write_text(self.out_dir / paths.SUMMARY, json.dumps(summary, indent=2, default=str))
        return summary
