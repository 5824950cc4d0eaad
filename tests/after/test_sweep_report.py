"""The sweep report's choice of the best job, on job dirs written as finished jobs leave them, and of the
best of several rounds dirs, written as make iterate leaves them."""

import json
from pathlib import Path
from types import SimpleNamespace

from dpo_recipes.after import judge as judges
from dpo_recipes.after import rounds, sweep
from dpo_recipes.rundir import paths


def finished_job(sweep_dir, number: int, accuracy: float, loss: float) -> None:
    job_dir = sweep_dir / f"{number}_job"
    (job_dir / paths.RECORD).mkdir(parents=True)
    final = {"eval_rewards/accuracies": accuracy, "eval_loss": loss}
    summary = {"status": "finished", "steps": 6, "final": final, "best": {}}
    paths.summary_file(job_dir).parent.mkdir(parents=True, exist_ok=True)
    paths.summary_file(job_dir).write_text(json.dumps(summary))


def test_a_tie_on_the_metric_is_said_with_the_tie_break_that_settled_it(tmp_path, capsys):
    for number, accuracy, loss in [(0, 0.75, 0.61), (1, 0.75, 0.58), (2, 0.5, 0.40)]:
        finished_job(tmp_path, number, accuracy, loss)
    report = sweep.write_report(tmp_path)
    assert report["best"]["job"] == 1 and report["tied_with"] == [0]
    out = capsys.readouterr().out
    assert "best: job 1" in out and "tied on eval_rewards/accuracies with job 0" in out
    assert "picked by the lowest final eval_loss = 0.58" in out


def test_a_clear_winner_names_no_tie(tmp_path, capsys):
    for number, accuracy, loss in [(0, 0.75, 0.61), (1, 0.5, 0.58)]:
        finished_job(tmp_path, number, accuracy, loss)
    assert sweep.write_report(tmp_path)["tied_with"] == []
    assert "tied" not in capsys.readouterr().out


def rounds_dir(parent, name: str, beta: float, wins: list[int], nproc: int = 1) -> None:
    """A rounds dir as make iterate leaves it: a round per entry of `wins` (of 20 prompts vs the start)."""
    rows = []
    for r, won in enumerate(wins, 1):
        versus = judges.compare([1.0] * won + [0.0] * (20 - won), [10] * 20, [10] * 20)
        sampled = {"pairs": 8, "prompts": 10, "judge_scores": {"mean": 0.0, "quartiles": [-1.0, 0.0, 1.0]}}
        rows.append({"round": r, "sampled": sampled, "vs_start": versus, "vs_previous": versus})
    report = {"overrides": ["recipes=tiny_rounds", f"train.beta={beta}"], "nproc": nproc, "start": "base",
              "rounds": rows}  # fmt: skip
    if rows:
        rounds.write(SimpleNamespace(dir=parent / name), report)
    else:  # as make iterate leaves a dir before its first round ends
        (parent / name).mkdir()
        (parent / name / paths.ROUNDS[0]).write_text(json.dumps(report))


def test_a_dir_of_rounds_dirs_ranks_them_by_their_last_round_against_the_start(tmp_path, capsys):
    rounds_dir(tmp_path, "steady", 0.1, [12, 15, 17])
    rounds_dir(tmp_path, "fast_then_worse", 0.5, [18, 14], nproc=2)
    rounds_dir(tmp_path, "none_yet", 1.0, [])
    assert sweep.main([str(tmp_path)]) == 0
    report = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [
        (Path(r["dir"]).name, r["overrides"], r["rounds"], r["rates_vs_start"]) for r in report["runs"]
    ] == [
        ("fast_then_worse", {"beta": 0.5, "nproc": 2}, 2, [0.9, 0.7]),
        ("none_yet", {"beta": 1.0}, 0, []),
        ("steady", {"beta": 0.1}, 3, [0.6, 0.75, 0.85]),
    ]
    assert Path(report["best"]["dir"]).name == "steady"
    assert {"beta", "nproc"} <= set((tmp_path / "sweep_summary.csv").read_text().splitlines()[0].split(","))
    assert (tmp_path / "sweep_curves.png").stat().st_size > 0
    assert "2 of 3 dirs with a finished round; best: " in capsys.readouterr().out
