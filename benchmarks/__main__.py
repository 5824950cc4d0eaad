"""`make bench`: run every benchmark, print the tables, write benchmarks/results.json and BENCHMARKS.md.

Benchmarks measure; they never fail a test run. Each reports the median of its repeats with min-max.
"""

import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

from benchmarks import (
    data_prep,
    evaluation,
    gpu,
    gpu_memory,
    gpu_rounds,
    jobs,
    memory,
    methods,
    overhead,
    rounds,
    share,
    spread,
    step,
    suite,
    sweep,
    tokenization,
)
from data_prep.io import write_text
from dpo_recipes import ROOT

BENCHMARKS = {
    "overhead": ("Overhead: `make train` vs a plain TRL script, default tiny recipe", overhead),
    "tokenization": ("Tokenization: our path vs TRL's `_prepare_dataset`", tokenization),
    "data_prep": (
        "Conversion throughput: 100,000 synthetic rows per layout and a 3-source mix, read -> convert -> write .jsonl",
        data_prep,
    ),
    "memory": ("Reference strategies: weights held and peak memory", memory),
    "sweep": ("Sweep jobs reuse the first job's tokenization", sweep),
    "jobs": ("Sweep jobs side by side (joblib) vs one after the other", jobs),
    "gpu": ("GPU: `qwen7b_lora_dpo` at Qwen2.5-7B's shape vs a plain TRL script (`make bench-gpu`)", gpu),
    "gpu_memory": (
        "GPU memory: predicted beside measured for LoRA, QLoRA and full fine-tuning with fp32 masters at "
        "Qwen2.5-1.5B's shape",
        gpu_memory,
    ),
    "gpu_rounds": (
        "GPU rounds: sampling through vLLM beside transformers' generate (tiny_rounds)",
        gpu_rounds,
    ),
    "step": (
        "Step: the CPU log-prob head, padding-free batches and the shared prompt vs TRL as shipped",
        step,
    ),
    "share": ("Share: the prompt computed once per pair vs TRL as shipped (tiny Llama)", share),
    "eval": ("Eval: `make eval`'s generation, batched vs one prompt at a time (tiny Llama)", evaluation),
    "spread": ("Spread: the default run's proof across instruction sets, threads and seeds", spread),
    "methods": ("Methods: each tiny method recipe as shipped, then `make eval`; SFT then DPO", methods),
    "rounds": ("Rounds: `make iterate RECIPE=tiny_rounds`, three rounds a seed, win rates and cost", rounds),
    "suite": ("Tests: the suite on a fresh clone, as CI runs it", suite),
}
# Run only when named: `make bench-gpu` is `python -m benchmarks gpu gpu_memory gpu_rounds`; the spread and the
# suite take most of an hour, the rounds and the methods minutes a seed.
ON_REQUEST = {"gpu", "gpu_memory", "gpu_rounds", "spread", "methods", "rounds", "suite"}
LIBRARIES = ["torch", "transformers", "trl", "peft", "datasets"]


def cpu() -> str:
    """The CPU's model name where Linux gives it (kernels and their speed differ between models)."""
    info = Path("/proc/cpuinfo")
    names = (
        [
            line.split(":", 1)[1].strip()
            for line in info.read_text().splitlines()
            if line.startswith("model name")
        ]
        if info.exists()
        else []
    )
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu(),
        "cores": os.cpu_count(),
        **({"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}),
        "python": platform.python_version(),
        **{name: version(name) for name in LIBRARIES},
    }


def main(only: list[str], root: Path = ROOT) -> None:
    """Run every benchmark but the GPU one, or those named (`make bench ONLY=data_prep`), keeping the
    others' last results; each section names the machine and date it was measured on."""
    path = root / "benchmarks" / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    earlier = results.pop("machine", {})  # from before each section kept its own
    for result in results.values():
        result.setdefault("machine", earlier)
    sections = []
    for name, (title, module) in BENCHMARKS.items():
        if name in only or (not only and name not in ON_REQUEST):
            print(f"== {title}", flush=True)
            results[name] = {**module.run(), "machine": machine()}
            print(module.table(results[name]) + "\n", flush=True)
        if name in results:
            info = ", ".join(f"{k} {v}" for k, v in results[name]["machine"].items())
            sections.append(f"## {title}\n\nMeasured on: {info}.\n\n{module.table(results[name])}\n")
        else:
            sections.append(
                f"## {title}\n\nNot measured yet: run `python -m benchmarks {name}` where it applies.\n"
            )
    write_text(path, json.dumps(results, indent=2))
    header = "# Benchmarks\n\n`make bench` (and `make bench-gpu` for the GPU section) wrote this file.\n\n"
    write_text(root / "BENCHMARKS.md", header + "\n".join(sections))


if __name__ == "__main__":
    main(sys.argv[1:])
