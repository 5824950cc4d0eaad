"""Rounds: `make iterate RECIPE=tiny_rounds` (three rounds) once per seed and build of the tiny models,
each in a fresh folder: every round's judged win rate against the start and the round before (95%
Wilson intervals over the 64 held-out prompts), the length ratio, and what the round cost here
(sampling, judging, training, the eval answers)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dpo_recipes import ROOT

SEEDS = (42, 1, 2)
# The tiny models as this machine's cache holds them, and built anew in an empty cache (as a first run
# and CI build them): builds made under other threads or library versions differ in their last bits,
# and a round's training can amplify that.
BUILDS = ("cached", "fresh")


def run(seeds: tuple = SEEDS, builds: tuple = BUILDS) -> dict:
    found = {}
    with tempfile.TemporaryDirectory() as fresh:
        for build in builds:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            env |= {"DPO_RECIPES_CACHE": fresh} if build == "fresh" else {}
            for seed in seeds:
                with tempfile.TemporaryDirectory() as cwd:
                    cmd = [
                        sys.executable,
                        "-m",
                        "dpo_recipes.after.rounds",
                        "--name",
                        "bench",
                        "recipes=tiny_rounds",
                    ]
                    subprocess.run([*cmd, f"train.seed={seed}"], cwd=cwd, env=env, check=True)
                    report = Path(cwd) / "outputs" / "tiny_rounds" / "bench" / "rounds.json"
                    found[f"{build}, seed {seed}"] = json.loads(report.read_text())["rounds"]
    return {"runs": found}


def rate(c: dict) -> str:
    return f"{c['win_rate']:.2f} ({c['interval'][0]:.2f}-{c['interval'][1]:.2f})"


def table(result: dict) -> str:
    lines = [
        "| models, seed | round | vs start (95% CI) | vs the round before | length ratio vs start | pairs | "
        "sampling s | judging s | training s | eval s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for seed, rounds in result["runs"].items():
        for r in rounds:
            t = r["seconds"]
            lines.append(
                f"| {seed} | {r['round']} | {rate(r['vs_start'])} | {rate(r['vs_previous'])} | "
                f"{r['vs_start']['length_ratio']:.2f} | {r['sampled']['pairs']} of {r['sampled']['prompts']} | "
                f"{t['sampling']:.1f} | {t['judging']:.1f} | {t.get('training', 0):.1f} | {t['eval']:.1f} |"
            )
    return "\n".join(lines) + (
        "\n\n`train.seed` sets the sampling seed too. The eval answers are greedy; ties of identical "
        "answers count half."
    )
