"""Sweep jobs side by side: a 2-job sweep of the tiny recipe as it ships (150 steps) through Hydra's
joblib launcher (both jobs at once, each with its share of the cores) against the same 2 jobs one after
the other (the basic launcher), whole sweep wall time, alternating.

    python -m benchmarks.jobs
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 3
LAUNCHERS = {"one after the other (basic)": [], "side by side (joblib, 2 jobs)": ["hydra/launcher=joblib"]}


def once(tmp: Path, name: str, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "dpo_recipes.train", "-m", "train.beta=0.1,0.2", "train.save_strategy=no"]
    cmd += ["train.disable_tqdm=true", f"hydra.sweep.dir={tmp}"]
    cmd += ["hydra.launcher.n_jobs=2"] if extra else []
    start = time.perf_counter()
    done = subprocess.run([*cmd, *extra], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{name}: {done.stderr[-3000:]}")
    return time.perf_counter() - start


def run(repeats: int = REPEATS) -> dict:
    times = {name: [] for name in LAUNCHERS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for j, (name, extra) in enumerate(LAUNCHERS.items()):  # alternate
                times[name].append(once(Path(tmp) / f"{i}-{j}", name, extra))
    rows = [
        {
            "what": name,
            "wall_s": round(statistics.median(t), 1),
            "min_max": [round(min(t), 1), round(max(t), 1)],
        }
        for name, t in times.items()
    ]
    return {
        "repeats": repeats,
        "results": rows,
        "ratio": round(rows[1]["wall_s"] / rows[0]["wall_s"], 3),
    }


def table(result: dict) -> str:
    lines = ["| 2 jobs of the tiny recipe | sweep wall s (min-max) |", "| --- | --- |"]
    lines += [
        f"| {r['what']} | {r['wall_s']} ({r['min_max'][0]}-{r['min_max'][1]}) |" for r in result["results"]
    ]
    lines += [
        "",
        f"Side by side / one after the other: {result['ratio']} (median of {result['repeats']}). Each job "
        "sets torch's threads to its share of the cores.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run()))
