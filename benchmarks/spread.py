"""Spread: the default run's learning proof across what varies between users' CPUs.

Each cell builds the tiny base with its seed in a scratch cache, trains the default recipe with
train.seed 42 + seed (seed 0 is the run as it ships) and samples held-out prompts, in a fresh process whose environment picks the instruction
set of ATen's kernels (ATEN_CPU_CAPABILITY) and of the matmuls (ONEDNN_MAX_CPU_ISA,
MKL_ENABLE_INSTRUCTIONS) and torch's thread count. It reports the final eval rewards/accuracies and the
share of answers in the asked-for mood (reference and policy). `tests/after/test_after.py` takes its margin
from the worst cell.

python -m benchmarks spread                    # every cell of GRID (about 20 min)
python -m benchmarks.spread ISA THREADS SEED [OVERRIDES]   # one cell, printed as JSON
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ISAS = {
    "best": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    },
}
SEEDS = (0, 1, 2, 3, 4)
# The cells measured: every seed at 2 threads on this machine's best kernels and on AVX2; the baseline
# kernels (about 3.5 min a cell) and 1 thread on fewer seeds.
GRID = [
    *[(isa, 2, seed) for isa in ("best", "avx2") for seed in SEEDS],
    ("default", 2, 0),
    *[("best", 1, seed) for seed in (0, 1)],
]
GREEDY = ["--n", "64"]  # `make samples` as it ships: greedy answers to the first 64 eval prompts


def cell(isa: str, threads: int, seed: int) -> dict:
    """One cell in a fresh process: its own cache, instruction set and threads."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, **ISAS[isa], "DPO_RECIPES_CACHE": tmp}
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.spread", isa, str(threads), str(seed)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])


def measure(isa: str, threads: int, seed: int, *overrides: str) -> dict:
    """In this process: build, train, sample; the numbers the proof rests on."""
    import torch

    from dpo_recipes import config, train
    from dpo_recipes.sources import assets, tiny

    torch.set_num_threads(threads)
    train.share_cores = lambda: threads  # the cell's count, not the machine's
    tiny.build(assets.cache_dir() / f"tiny-llama-v{tiny.VERSION}", seed=seed)
    train_seed = 42 + seed  # seed 0 is the default run as it ships: base seed 0, train.seed 42
    cfg, recipe = config.compose([f"train.seed={train_seed}", "train.disable_tqdm=true", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        trainer = train.run(cfg, run_dir, recipe)
        accuracy = [e["eval_rewards/accuracies"] for e in trainer.state.log_history if "eval_loss" in e][-1]
        greedy = rates(run_dir, GREEDY)
    return {
        "isa": isa,
        "threads": threads,
        "seed": seed,
        "eval_accuracy": round(accuracy, 3),
        **greedy,
        "margin": round(greedy["policy"] - greedy["reference"], 3),
    }


def rates(run_dir: Path, how: list[str]) -> dict:
    """The share of answers in the asked-for mood, reference and policy, from `make samples` run so."""
    from dpo_recipes.after import samples

    assert samples.main([str(run_dir), *how]) == 0
    rows = [json.loads(line) for line in (run_dir / "dpo_metrics/samples.jsonl").read_text().splitlines()]
    eval_rows = [json.loads(line) for line in (ROOT / "data/toy/eval.jsonl").read_text().splitlines()]
    return samples.mood_rates(rows, samples.mood_words(eval_rows))


def run() -> dict:
    rows = []
    for isa, threads, seed in GRID:
        rows.append(cell(isa, threads, seed))
        print(json.dumps(rows[-1]), flush=True)
    worst = {key: min(r[key] for r in rows) for key in ("margin", "policy", "eval_accuracy")}
    return {
        "rows": rows,
        "worst": worst,
        "reference_range": [min(r["reference"] for r in rows), max(r["reference"] for r in rows)],
    }


def table(result: dict) -> str:
    lines = [
        "| instruction set | threads | seed | eval rewards/accuracies | reference mood | policy mood | margin |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['isa']} | {r['threads']} | {r['seed']} | {r['eval_accuracy']:.2f} | "
            f"{r['reference']:.0%} | {r['policy']:.0%} | {r['margin']:+.2f} |"
        )
    worst, low, high = result["worst"], *result["reference_range"]
    return "\n".join(lines) + (
        f"\n\nWorst cell: policy {worst['policy']:.0%}, margin {worst['margin']:+.2f}, eval accuracy "
        f"{worst['eval_accuracy']:.2f}; the reference ranges {low:.0%}-{high:.0%}. Mood: greedy answers to "
        "the first 64 eval prompts in the asked-for mood (`make samples N=64`). `best` is this machine's "
        "own kernels; `avx2` and `default` cap ATen, oneDNN and MKL at AVX2 and at their baseline. Seed s "
        "builds the tiny base with seed s and trains with train.seed 42 + s (seed 0 is the run as it ships). "
        "The tiny model writes one answer per mood whatever the topic, so a greedy rate rests on two "
        "answers: one mood's answer turning mixed takes a third of the prompts at once; eval accuracy is "
        "the steady measure."
    )


if __name__ == "__main__":
    isa, threads, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(measure(isa, threads, seed, *sys.argv[4:])))  # overrides: a candidate recipe
