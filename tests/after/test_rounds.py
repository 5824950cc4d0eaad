"""On-policy rounds (dpo_recipes/after/rounds.py): the pairing rule and its counted drops, the refusals,
and the tiny recipe's three rounds as `make iterate` runs them, judged round over round and resumed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_recipes import errors
from dpo_recipes.after import judge as judges
from dpo_recipes.after import rounds

ROOT = Path(__file__).resolve().parents[2]


def test_each_prompt_pairs_its_best_scored_answer_against_its_worst_and_counts_what_it_drops():
    chat = [{"role": "user", "content": "Hi"}]
    found, dropped = rounds.pairs(
        [chat, "Plain", chat, chat],
        [["a", "b", "c"], ["x", "y"], ["same", "same"], ["p", "q"]],
        [[0.1, 2.0, -1.0], [1.0, 0.0], [3.0, 1.0], [0.5, 0.7]],
        min_margin=0.5,
    )
    assert found == [
        {"prompt": chat, "chosen": [{"role": "assistant", "content": "b"}],
         "rejected": [{"role": "assistant", "content": "c"}]},
        {"prompt": "Plain", "chosen": " x", "rejected": " y"},
    ]  # fmt: skip
    assert dropped == {"same_answer": 1, "small_margin": 1}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["recipes=tiny_rounds", "judge=none"], "judge.kind=none: rounds score each sampled answer"),
        (["recipes=tiny_rounds", "rounds.samples=1"], "rounds.samples must be at least 2"),
        (["recipes=tiny_kto", "judge=tiny"], "task=kto: rounds train DPO"),
    ],
)
def test_rounds_refuse_what_they_cannot_run_before_any_weight_loads(overrides, expected):
    with pytest.raises(errors.ConfigError, match=expected):
        rounds.prepare("refused", overrides)


def iterate(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dpo_recipes.after.rounds", "--name", "r", "recipes=tiny_rounds", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def numbers(report: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in report]


@pytest.mark.e2e
def test_three_rounds_of_the_tiny_recipe_learn_from_their_own_answers_and_resume(tmp_path):
    """From the tiny base, on its own sampled answers and the tiny judge only: the first round's greedy
    answers beat the start's with the interval above 1/2, the last round's at 0.8 or more (BENCHMARKS.md,
    Rounds: every round over three seeds). A round that lost its export and its answers after training redoes only those, to the same
    numbers; a finished round is not trained again; other settings in the same dir are refused."""
    done = iterate(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    where = tmp_path / "outputs" / "tiny_rounds" / "r"
    report = json.loads((where / "rounds.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    first, last = report["rounds"][0]["vs_start"], report["rounds"][-1]["vs_start"]
    assert first["interval"][0] > 0.5 and last["win_rate"] >= 0.8 and last["interval"][0] > 0.5, report[
        "rounds"
    ]
    assert all(f"round {r}: win rate vs start" in done.stdout for r in (1, 2, 3))
    held_out = {judges.unit(row["prompt"]) for row in rows_of(where / "data" / "eval.jsonl")}
    for r in report["rounds"]:
        rows = rows_of(where / "data" / f"round-{r['round']}.jsonl")
        assert len(rows) == r["sampled"]["pairs"] and not held_out & {judges.unit(x["prompt"]) for x in rows}
        assert (
            json.loads((tmp_path / r["run"] / "dpo_metrics" / "summary.json").read_text())["status"]
            == "finished"
        )
    assert (where / "rounds.png").stat().st_size > 0 and (where / "rounds.md").exists()

    shutil.rmtree(where / "round-3" / "export")
    (where / "data" / "answers-round-3.json").unlink()
    again = iterate(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run finished" not in again.stdout  # no round trained again
    resumed = json.loads((where / "rounds.json").read_text())["rounds"]
    assert numbers(resumed) == numbers(report["rounds"])
    mixed = iterate(tmp_path, "rounds.samples=3")
    assert mixed.returncode == 2 and "one report would mix two experiments" in mixed.stderr
