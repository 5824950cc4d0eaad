"""`make bench`: run every benchmark, print the tables, write benchmarks/results.json and BENCHMARKS.md.

Benchmarks measure; they never fail a test run. Each reports the median of its repeats with min-max.
"""

import json
import os
import platform
import sys
import time
from importlib.metadata import version

from benchmarks import data_prep, memory, overhead, sweep, tokenization
from data_prep.io import write_text
from dpo_recipes import ROOT

BENCHMARKS = {
    "overhead": ("Overhead: `make train` vs a plain TRL script, default tiny recipe", overhead),
    "tokenization": ("Tokenization: our path vs TRL's `_prepare_dataset`", tokenization),
    "data_prep": (
        "Conversion throughput: 100,000 synthetic rows per format, read -> convert -> write .jsonl",
        data_prep,
    ),
    "memory": ("Reference strategies: weights held and peak memory", memory),
    "sweep": ("Sweep jobs reuse the first job's tokenization", sweep),
}
LIBRARIES = ["torch", "transformers", "trl", "peft", "datasets"]


def machine() -> dict:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        **{name: version(name) for name in LIBRARIES},
    }


def main(only: list[str]) -> None:
    """Run every benchmark, or those named (`make bench ONLY=data_prep`), keeping the others' last results."""
    path = ROOT / "benchmarks" / "results.json"
    results = json.loads(path.read_text()) if only and path.exists() else {}
    results["machine"] = machine()
    sections = []
    for name, (title, module) in BENCHMARKS.items():
        if not only or name in only:
            print(f"== {title}", flush=True)
            results[name] = module.run()
            print(module.table(results[name]) + "\n", flush=True)
        if name in results:
            sections.append(f"## {title}\n\n{module.table(results[name])}\n")
    write_text(path, json.dumps(results, indent=2))
    info = ", ".join(f"{k} {v}" for k, v in results["machine"].items())
    write_text(
        ROOT / "BENCHMARKS.md",
        f"# Benchmarks\n\n`make bench` wrote this file ({info}).\n\n" + "\n".join(sections),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
