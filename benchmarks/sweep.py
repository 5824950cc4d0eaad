"""Sweep jobs reuse the first job's tokenization: seconds in TRL's dataset preparation per job.

    python -m benchmarks.sweep

A 3-job sweep over beta (one training step each) on 3,000 synthetic conversational rows, with a fresh
`datasets` cache: job 0 tokenizes, jobs 1 and 2 should find its work in the cache. Peak RSS per job
shows that jobs sharing one process do not accumulate memory.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.data_prep import text

ROOT = Path(__file__).resolve().parent.parent
ROWS = 3000


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rng = random.Random(0)
        data = Path(tmp) / "prefs.jsonl"
        with data.open("w") as f:
            for _ in range(ROWS):
                row = {
                    "prompt": [{"role": "user", "content": text(rng, 150)}],
                    "chosen": [{"role": "assistant", "content": text(rng, 150)}],
                    "rejected": [{"role": "assistant", "content": text(rng, 150)}],
                }
                f.write(json.dumps(row) + "\n")
        sweep_dir = Path(tmp) / "sweep"
        cmd = [
            sys.executable,
            "-m",
            "dpo_recipes.train",
            "-m",
            f"hydra.sweep.dir={sweep_dir}",
            f"dataset.path={data}",
            "dataset.eval_path=null",
            "train.max_steps=1",
            "train.eval_strategy=no",
            "train.max_length=4096",
            "train.disable_tqdm=true",
            "train.beta=0.1,0.2,0.3",
        ]
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf")}
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    return {
        "rows": ROWS,
        "results": [
            {
                "job": j["job"],
                "beta": j["overrides"]["beta"],
                "tokenize_s": j["tokenize_s"],
                "peak_rss_mb": j["peak_rss_mb"],
            }
            for j in jobs
        ],
    }


def table(result: dict) -> str:
    lines = [
        f"{result['rows']:,} rows, one process, fresh cache.",
        "",
        "| job | beta | tokenize s | peak RSS MB (process so far) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['job']} | {r['beta']} | {r['tokenize_s']} | {r['peak_rss_mb']} |" for r in result["results"]
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run()))
