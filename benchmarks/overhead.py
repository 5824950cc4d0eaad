"""Overhead: the default tiny recipe through `python -m dpo_recipes.train` (what `make train` runs) vs
the same settings as a plain TRL script (benchmarks/plain_trl.py), each in fresh processes, alternating.

The headline is the whole process's wall time, start-up to exit, as a user waits for it (both run
under the same timing wrapper, benchmarks/timed.py). The wrapper also gives the time to the first
optimizer step, the median step time, peak RSS, and the logged loss and grad-norm trajectories, which
must be equal (within float rounding: on CPU the recipe layer's log-prob head folds TRL's arithmetic in
another order).
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 3
TARGETS = {
    "make train (dpo_recipes)": lambda out: [
        "dpo_recipes.train",
        "train.disable_tqdm=true",
        f"hydra.run.dir={out}",
    ],
    "plain TRL script": lambda out: [str(ROOT / "benchmarks" / "plain_trl.py"), str(out)],
}


def once(name: str, tmp: Path, i: int) -> dict:
    out = tmp / f"{i}-{name.split()[0]}"
    result = tmp / f"{i}-{name.split()[0]}.json"
    cmd = [sys.executable, "-m", "benchmarks.timed", str(result), *TARGETS[name](out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return {**json.loads(result.read_text()), "wall_s": wall}


def run(repeats: int = REPEATS) -> dict:
    runs = {name: [] for name in TARGETS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for name in TARGETS:  # alternate, so drift in the machine's speed hits both alike
                runs[name].append(once(name, Path(tmp), i))
    rows = []
    for name, results in runs.items():
        first = [r["first_step_s"] for r in results]
        wall = [r["wall_s"] for r in results]
        step = [statistics.median(r["step_s"]) for r in results]
        rows.append(
            {
                "what": name,
                "wall_s": round(statistics.median(wall), 2),
                "wall_min_max": [round(min(wall), 2), round(max(wall), 2)],
                "first_step_s": round(statistics.median(first), 2),
                "first_step_min_max": [round(min(first), 2), round(max(first), 2)],
                "step_ms": round(1000 * statistics.median(step), 1),
                "step_ms_min_max": [round(1000 * min(step), 1), round(1000 * max(step), 1)],
                "peak_rss_mb": round(max(r["peak_rss_mb"] for r in results)),
            }
        )
    ours, plain = (runs[name][0] for name in TARGETS)
    return {
        "repeats": repeats,
        "results": rows,
        "wall_time_ratio": round(rows[0]["wall_s"] / rows[1]["wall_s"], 3),
        "step_time_ratio": round(rows[0]["step_ms"] / rows[1]["step_ms"], 3),
        "first_step_delta_s": round(rows[0]["first_step_s"] - rows[1]["first_step_s"], 2),
        # The CPU log-prob head folds TRL's arithmetic in another order: equal within float rounding.
        **{
            f"max_{k}_diff": max(abs(a - b) for a, b in zip(ours[k], plain[k], strict=True))
            for k in ("loss", "grad_norm")
        },
        "logged_steps": len(ours["loss"]),
    }


def table(result: dict) -> str:
    lines = [
        "| run | wall s, whole process (min-max) | time to first step s (min-max) | step ms (min-max) | peak RSS MB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["results"]:
        (a, b), (c, d) = r["first_step_min_max"], r["step_ms_min_max"]
        w = r.get("wall_min_max", ["-", "-"])
        lines.append(
            f"| {r['what']} | {r.get('wall_s', '-')} ({w[0]}-{w[1]}) | {r['first_step_s']} ({a}-{b}) | {r['step_ms']} ({c}-{d}) | {r['peak_rss_mb']} |"
        )
    lines += [
        "",
        f"**Wall time ratio {result.get('wall_time_ratio', '-')}** (whole process, `make train` / plain TRL). Step time ratio {result['step_time_ratio']}, time to first step {result['first_step_delta_s']:+} s; "
        f"largest difference over the {result['logged_steps']} logged steps: loss {result['max_loss_diff']:.1e}, "
        f"grad-norm {result['max_grad_norm_diff']:.1e}. Median of {result['repeats']} runs.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run()))
