"""Step: the CPU log-prob head (dpo_recipes/trainer.py) against TRL's as shipped.

Two measures, each alternating the two heads in fresh processes so that drift hits both alike:
- the Qwen smoke line as a user runs it (`qwen7b_lora_dpo +smoke=tiny_qwen train.max_steps=4`: the
  real 152,064-token vocabulary, real-length UltraFeedback rows), whole-process wall time and median
  step time, peak RSS; TRL's head is had by turning ours off (`trainer.cpu_head` made a no-op);
- the tiny Llama default recipe's median step time, the same way.
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 2
CASES = {
    "tiny Qwen smoke, 4 steps": ["recipes=qwen7b_lora_dpo", "+smoke=tiny_qwen", "train.max_steps=4"],
    "tiny Llama default, 30 steps": ["train.max_steps=30", "train.eval_strategy=no"],
}
CHILD = """
import contextlib, json, sys, time
start = time.perf_counter()
from dpo_recipes import config, train, trainer
from dpo_recipes.metrics import peak_rss_mb
if sys.argv[2] == "trl":
    trainer.cpu_head = contextlib.nullcontext
cfg, recipe = config.compose(["train.disable_tqdm=true", *sys.argv[3:]])
t = train.run(cfg, __import__("pathlib").Path(sys.argv[1]), recipe)
steps = [e["train_runtime"] for e in t.state.log_history if "train_runtime" in e]
print(json.dumps({"wall_s": time.perf_counter() - start, "train_s": steps[0],
                  "step_s": steps[0] / t.state.global_step, "peak_rss_mb": peak_rss_mb()}))
"""


def once(head: str, overrides: list[str], tmp: Path, i: int) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(tmp / f"{head}-{i}"), head, *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(repeats: int = REPEATS) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, overrides in CASES.items():
            runs = {"trl": [], "ours": []}
            for i in range(repeats):
                for head in runs:
                    runs[head].append(once(head, overrides, Path(tmp) / case.split()[1], i))
            median = {h: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for h, rs in runs.items()}
            rows.append(
                {
                    "case": case,
                    **{f"{h}_{k}": round(v, 2) for h, m in median.items() for k, v in m.items()},
                    "step_ratio": round(median["ours"]["step_s"] / median["trl"]["step_s"], 3),
                    "wall_ratio": round(median["ours"]["wall_s"] / median["trl"]["wall_s"], 3),
                }
            )
    return {"rows": rows, "repeats": repeats}


def table(result: dict) -> str:
    lines = [
        "| case | head | step s | train s | process wall s | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        for head, name in (("trl", "TRL 1.16 as shipped"), ("ours", "CPU head")):
            lines.append(
                f"| {r['case']} | {name} | {r[f'{head}_step_s']} | {r[f'{head}_train_s']} | "
                f"{r[f'{head}_wall_s']} | {r[f'{head}_peak_rss_mb']:.0f} |"
            )
        lines.append(f"| {r['case']} | ratio (CPU head / TRL) | {r['step_ratio']} | | {r['wall_ratio']} | |")
    return "\n".join(lines) + f"\n\nMedian of {result['repeats']} alternating runs in fresh processes."
