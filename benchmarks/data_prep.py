"""Conversion throughput: rows/s and peak memory per layout on 100,000 synthetic rows, and a 3-source mix.

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
    if fmt == "typed_parts":  # whole conversations under other names, typed parts, a per-message key

        def message(role, content):
            return {"role": role, "content": [{"type": "text", "value": content}], "loss_weight": 1.0}

        turn = message("user", q)
        return {
            "chosen_messages": [turn, message("assistant", good)],
            "rejected_messages": [turn, message("assistant", bad)],
        }
    turn = {"role": "user", "content": q}
    return {
        "prompt": q,
        "chosen": [turn, {"role": "assistant", "content": good}],
        "rejected": [turn, {"role": "assistant", "content": bad}],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }


# How each layout converts: the format and the column mapping.
LAYOUTS = {
    "alpaca": {"format": "alpaca"},
    "ultrafeedback": {"format": "ultrafeedback"},
    "sharegpt": {"format": "sharegpt"},
    "typed_parts": {
        "format": "ultrafeedback",
        "columns": {"chosen": "chosen_messages", "rejected": "rejected_messages"},
    },
}
MIX = ("alpaca", "ultrafeedback", "sharegpt")  # the 3-source mix: all of each, through dataset.sources

CHILD = """
import json, sys, time, datasets
datasets.disable_caching()
datasets.logging.disable_progress_bar()
from data_prep import io
sources, out, procs = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
procs = procs if procs > 1 else None
alone = 0.0
if len(sources) > 1:  # a mix, as training builds it: data.load with dataset.sources
    from dpo_recipes.config.schema import DatasetSchema
    from dpo_recipes.training.data import load
    for source in sources:  # each source alone first, in this same process, for the comparison
        start = time.perf_counter()
        io.write(load(DatasetSchema(sources=[source]), 42, procs)[0], out)
        alone += time.perf_counter() - start
    start = time.perf_counter()
    kept, _, report = load(DatasetSchema(sources=sources), 42, procs)
    kept_rows = report["train"]["rows_mixed"]
else:
    from data_prep.pipeline import Options, convert, read
    (source,) = sources
    start = time.perf_counter()
    options = Options(format=source["format"], columns=source.get("columns", {}), num_proc=procs)
    kept, report = convert(read(source["path"]), options)
    kept_rows = report["rows_out"]
io.write(kept, out)
seconds = time.perf_counter() - start
# Peak resident memory (VmHWM, see dpo_recipes.training.metrics.peak_rss_mb), read here, after the work.
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(seconds, kept_rows, round(peak), alone)  # with 2 processes: the main process only
"""


def _measure(sources: list[dict], out: Path, procs: int, repeats: int, rows: int) -> dict:
    runs = []
    for i in range(repeats):
        cmd = [
            sys.executable,
            "-c",
            CHILD,
            json.dumps(sources),
            str(out.with_suffix(f".{i}.jsonl")),
            str(procs),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        seconds, kept, peak_mb, alone = done.stdout.strip().splitlines()[-1].split()  # the last line
        assert int(kept) == rows
        runs.append((float(seconds), int(peak_mb), float(alone)))
    times = [s for s, _, _ in runs]
    return {
        "num_proc": procs,
        "rows": rows,
        "rows_per_s": round(rows / statistics.median(times)),
        "seconds_median": round(statistics.median(times), 2),
        "seconds_min_max": [round(min(times), 2), round(max(times), 2)],
        "peak_rss_mb": max(p for _, p, _ in runs),
        "sources_alone_s": round(statistics.median(a for _, _, a in runs), 2),
    }


def run(rows: int = 100_000, repeats: int = 3) -> dict:
    results, sources = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout, rules in LAYOUTS.items():
            rng = random.Random(0)
            src = Path(tmp) / f"{layout}.jsonl"
            with src.open("w") as f:
                for _ in range(rows):
                    f.write(json.dumps(synthetic(layout, rng)) + "\n")
            sources[layout] = {"path": str(src), **rules}
            for procs in (1, 2):
                measured = _measure(
                    [sources[layout]], Path(tmp) / f"out-{layout}-{procs}", procs, repeats, rows
                )
                results.append({"format": layout, **measured})
        mix = [sources[layout] for layout in MIX]
        results.append(
            {
                "format": "mix of " + " + ".join(MIX),
                **_measure(mix, Path(tmp) / "mix", 1, repeats, rows * len(MIX)),
            }
        )
    mix = results[-1]
    ratio = round(mix["seconds_median"] / mix["sources_alone_s"], 3)
    return {"repeats": repeats, "results": results, "mix_vs_sources_alone": ratio}


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
    if "mix_vs_sources_alone" in result:
        lines.append(
            f"\nThe mix takes {result['mix_vs_sources_alone']}x the time of converting its three sources one by one "
            "in the same process (1 process): mixing adds index mappings, not a second pass over the rows."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(table(run(args.rows, args.repeats)))
