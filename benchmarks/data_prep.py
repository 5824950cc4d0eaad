"""Conversion throughput: rows/s and peak memory per format on 100,000 synthetic rows.

    python -m benchmarks.data_prep [--rows N] [--repeats R]

Each conversion (read -> convert -> write .jsonl, as the CLI does) runs in a fresh process with the
`datasets` cache off, so peak RSS is that conversion's own and no run reuses another's work.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = [
    "the",
    "a",
    "model",
    "answer",
    "prompt",
    "good",
    "bad",
    "helpful",
    "clear",
    "short",
    "long",
    "data",
    "pair",
    "reward",
    "policy",
    "token",
]


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def synthetic(fmt: str, rng: random.Random) -> dict:
    q, good, bad = text(rng, 30), text(rng, 60), text(rng, 60)
    if fmt == "alpaca":
        return {"instruction": q, "input": "", "chosen": good, "rejected": bad}
    if fmt == "sharegpt":
        return {
            "conversations": [{"from": "human", "value": q}],
            "chosen": {"from": "gpt", "value": good},
            "rejected": {"from": "gpt", "value": bad},
        }
    turn = {"role": "user", "content": q}
    return {
        "prompt": q,
        "chosen": [turn, {"role": "assistant", "content": good}],
        "rejected": [turn, {"role": "assistant", "content": bad}],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }


CHILD = """
import sys, time, datasets
datasets.disable_caching()
datasets.logging.disable_progress_bar()
from data_prep import io
from data_prep.pipeline import Options, convert, read
fmt, src, out, procs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
kept, report = convert(read(src), Options(format=fmt, num_proc=procs if procs > 1 else None))
io.write(kept, out)
seconds = time.perf_counter() - start
# Peak resident memory (VmHWM, see dpo_recipes.metrics.peak_rss_mb), read here without importing torch.
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(seconds, report["rows_out"], round(peak))  # with 2 processes: the main process only
"""


def run(rows: int = 100_000, repeats: int = 3) -> dict:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("alpaca", "ultrafeedback", "sharegpt"):
            rng = random.Random(0)
            src = Path(tmp) / f"{fmt}.jsonl"
            with src.open("w") as f:
                for _ in range(rows):
                    f.write(json.dumps(synthetic(fmt, rng)) + "\n")
            for procs in (1, 2):
                runs = []
                for i in range(repeats):
                    out = Path(tmp) / f"out-{fmt}-{procs}-{i}.jsonl"
                    cmd = [sys.executable, "-c", CHILD, fmt, str(src), str(out), str(procs)]
                    seconds, kept, peak_mb = subprocess.run(
                        cmd, capture_output=True, text=True, check=True
                    ).stdout.split()
                    assert int(kept) == rows
                    runs.append((float(seconds), int(peak_mb)))
                times = [s for s, _ in runs]
                results.append(
                    {
                        "format": fmt,
                        "num_proc": procs,
                        "rows": rows,
                        "rows_per_s": round(rows / statistics.median(times)),
                        "seconds_median": round(statistics.median(times), 2),
                        "seconds_min_max": [round(min(times), 2), round(max(times), 2)],
                        "peak_rss_mb": max(p for _, p in runs),
                    }
                )
    return {"repeats": repeats, "results": results}


def table(result: dict) -> str:
    lines = [
        "| format | processes | rows/s | median s (min-max) | peak RSS MB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["results"]:
        low, high = r["seconds_min_max"]
        lines.append(
            f"| {r['format']} | {r['num_proc']} | {r['rows_per_s']:,} | {r['seconds_median']} ({low}-{high}) | {r['peak_rss_mb']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(table(run(args.rows, args.repeats)))
