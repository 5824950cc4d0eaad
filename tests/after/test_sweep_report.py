"""The sweep report's choice of the best job, on job dirs written as finished jobs leave them."""

import json

from dpo_recipes.after import sweep
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
