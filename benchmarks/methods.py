"""Methods: each tiny method recipe as shipped (`make train RECIPE=...`, then `make eval` on the run), once
per seed, each in a fresh process: the final eval metric its task ranks by, the time a step, the peak
memory the pre-flight predicted beside the one measured over the first two steps, and the tiny judge's
win rate of the policy's greedy answers over the base's (95% Wilson interval over the 64 held-out
prompts). The two-stage row: `tiny_sft`, then `tiny_lora_dpo` from its adapter (reference=sft_adapter),
its answers judged prompt by prompt against those of `tiny_lora_dpo` from the base at the same seed.

python -m benchmarks methods                   # every recipe at each seed in SEEDS (minutes a run)
python -m benchmarks.methods RECIPE SEED       # one run (RECIPE sft_then_dpo: the two-stage row), as JSON
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("tiny_lora_dpo", "tiny_simpo", "tiny_orpo", "tiny_kto", "tiny_sft", "sft_then_dpo")
SEEDS = (42, 1, 2)  # the recipes' own train.seed first


def run(recipes: tuple = RECIPES, seeds: tuple = SEEDS) -> dict:
    found = []
    for recipe in recipes:
        for seed in seeds:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.methods", recipe, str(seed)],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if done.returncode:
                raise RuntimeError(f"{recipe}, seed {seed}:\n{done.stderr[-3000:]}")
            found.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(found[-1]), flush=True)  # kept in the log should a later run fail
    return {"runs": found}


def trained(recipe: str, seed: int, run_dir: Path, *overrides: str) -> dict:
    """Train as `make train` does, then `make eval`; what summary.json and eval.json say."""
    from dpo_recipes import config, train
    from dpo_recipes.after import evaluate
    from dpo_recipes.after.sweep import PAIRED, TASK_METRIC
    from dpo_recipes.rundir import paths

    cfg, name = config.compose(
        [f"recipes={recipe}", f"train.seed={seed}", "++train.disable_tqdm=true", *overrides]
    )
    train.run(cfg, run_dir, name)
    if evaluate.main([str(run_dir)]):
        raise RuntimeError(f"make eval failed on {run_dir}")
    summary = json.loads(paths.summary_file(run_dir).read_text())
    metric, _ = TASK_METRIC.get(summary.get("task", "dpo"), PAIRED)
    memory = summary.get("memory") or {}  # SFT is not predicted
    return {
        "metric": metric,
        "value": round(summary["final"][metric], 3),
        "steps": summary["steps"],
        "s_per_step": round(summary["runtime_s"] / summary["steps"], 3),
        "predicted_mb": memory.get("predicted_peak_mb"),
        "measured_mb": memory.get("measured_peak_mb"),
        "vs_base": summary["eval"]["comparisons"]["policy_vs_reference"],
    }


def answers(run_dir: Path) -> dict:
    """make eval's greedy answer to each held-out prompt (eval.jsonl), keyed by the prompt."""
    from dpo_recipes.after import judge
    from dpo_recipes.rundir import paths

    rows = (paths.metrics_dir(run_dir) / paths.EVAL[0]).read_text().splitlines()
    return {
        judge.unit(row["prompt"]): (row["prompt"], row["policy"])
        for row in map(json.loads, rows)
        if row["comparison"] == "policy_vs_reference"
    }


def two_stage(seed: int, tmp: Path) -> dict:
    """SFT, DPO from its adapter, and DPO from the base: the first DPO's answers judged against the second's."""
    from dpo_recipes.after import judge
    from dpo_recipes.sources import tiny

    sft = trained("tiny_sft", seed, tmp / "sft")
    after = trained(
        "tiny_lora_dpo", seed, tmp / "after", "reference=sft_adapter", f"reference.path={tmp / 'sft'}"
    )
    trained("tiny_lora_dpo", seed, tmp / "base")  # the same recipe from the base, for the last column
    a, b = answers(tmp / "after"), answers(tmp / "base")
    units = [u for u in a if u in b]
    prompts = [a[u][0] for u in units]
    prefs, _ = judge.load("reward", str(tiny.judge_path())).prefer(
        prompts, [a[u][1] for u in units], [b[u][1] for u in units]
    )
    versus = judge.compare(prefs, [len(a[u][1]) for u in units], [len(b[u][1]) for u in units])
    return {**after, "sft_vs_base": sft["vs_base"], "vs_dpo_from_base": versus}


def rate(c: dict) -> str:
    return f"{c['win_rate']:.2f} ({c['interval'][0]:.2f}-{c['interval'][1]:.2f}; {c['wins']}-{c['ties']}-{c['losses']})"


def table(result: dict) -> str:
    lines = [
        "| recipe | seed | final eval metric | s a step | peak MB predicted / measured | judged over the base, "
        "win rate (95% CI; wins-ties-losses) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        predicted, measured = r.get("predicted_mb"), r.get("measured_mb")
        memory = (
            "not predicted"
            if not predicted
            else "not measured"
            if not measured
            else (f"{predicted:.0f} / {measured:.0f} ({predicted / measured:.2f})")
        )
        over = rate(r["vs_base"])
        if "vs_dpo_from_base" in r:
            over = f"over the SFT model: {over}; over `tiny_lora_dpo` from the base: {rate(r['vs_dpo_from_base'])}"
        lines.append(
            f"| {r['recipe']} | {r['seed']} | {r['metric']} {r['value']} | {r['s_per_step']} | {memory} | {over} |"
        )
    return "\n".join(lines) + (
        "\n\nEach row is the recipe as shipped at `train.seed` SEED, then `make eval` (greedy answers, the "
        "tiny judge, ties count half). `sft_then_dpo`: `tiny_sft`, then `tiny_lora_dpo` with "
        "`reference=sft_adapter` on it; its base is the SFT model, and its last column also judges its "
        "answers against those of `tiny_lora_dpo` from the base at the same seed. Memory is the CPU tracker's "
        "peak over the first two steps beside the pre-flight's prediction (their ratio): the prediction is "
        "for rows of `train.max_length` tokens, the toy's are far shorter, so it is an upper bound here "
        "(tests/memory/test_memory.py compares the two on rows that fill their length). SFT is not predicted."
    )


def one(recipe: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        found = (
            two_stage(seed, Path(tmp))
            if recipe == "sft_then_dpo"
            else trained(recipe, seed, Path(tmp) / "run")
        )
    return {"recipe": recipe, "seed": seed, **found}


if __name__ == "__main__":
    print(json.dumps(one(sys.argv[1], int(sys.argv[2]))))
