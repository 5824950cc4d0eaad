"""Sweeps: a 2 x 2 beta x learning-rate grid, its report, failed jobs, and other launchers."""

import csv
import gc
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import yaml
from conftest import python_m, tiny_overrides

from dpo_recipes import ROOT, config, train
from dpo_recipes.after import sweep

pytestmark = pytest.mark.e2e
FAST = ["++train.max_steps=6", "++train.eval_steps=3", "++train.logging_steps=3", "++train.disable_tqdm=true"]
SMALL = ["dataset.max_samples=64", "dataset.max_eval_samples=16"]


def multirun(sweep_dir, *args, own_process=False):
    """`make sweep`: in this process, or in its own (`own_process`): a relaunch, as a user's, starts
    afresh, and a launcher that pickles the task function needs it importable."""
    args = ["-m", f"hydra.sweep.dir={sweep_dir}", *FAST, *SMALL, *args]
    if not own_process:
        return python_m("dpo_recipes.train", *args)
    cmd = [sys.executable, "-m", "dpo_recipes.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "grid"
    out = multirun(sweep_dir, "+sweep=tiny_beta_lr")
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep_dir


def test_four_jobs_each_with_their_own_metrics(grid):
    jobs = sorted(d for d in grid.iterdir() if d.is_dir())
    assert [d.name.split("_")[0] for d in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert (job / "dpo_metrics" / "summary.json").exists()
        assert "train.beta=" in job.name and "train.learning_rate=" in job.name


def test_summary_rows_match_each_jobs_own_summary(grid):
    rows = read_csv(grid / "sweep_summary.csv")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    assert {(float(r["beta"]), float(r["learning_rate"])) for r in rows} == {
        (b, lr) for b in (0.1, 0.5) for lr in (5e-4, 1e-3)
    }
    for row in rows:
        own = json.loads((Path(row["dir"]) / "dpo_metrics" / "summary.json").read_text())
        assert float(row["final_eval_rewards/accuracies"]) == pytest.approx(
            own["final"]["eval_rewards/accuracies"]
        )
        assert float(row["final_eval_loss"]) == pytest.approx(own["final"]["eval_loss"])
        assert float(row["runtime_s"]) == pytest.approx(own["runtime_s"])


def test_best_job_is_the_best_row_of_the_csv(grid):
    report = json.loads((grid / "sweep_summary.json").read_text())
    rows = read_csv(grid / "sweep_summary.csv")
    best = max(rows, key=lambda r: (float(r["final_eval_rewards/accuracies"]), -float(r["final_eval_loss"])))
    assert report["best"]["job"] == int(best["job"]) and report["best"]["dir"] == best["dir"]
    assert report["metric"] == "eval_rewards/accuracies" and report["higher_is_better"] is True


def test_curves_and_heatmap_are_a_real_image(grid):
    png = (grid / "sweep_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000


def test_jobs_reuse_the_first_jobs_tokenization(grid):
    summaries = [json.loads(p.read_text()) for p in sorted(grid.glob("*/dpo_metrics/summary.json"))]
    files = {s["tokenize"]["train"]["cache_file"] for s in summaries}
    assert len(files) == 1 and None not in files


def test_report_can_be_rebuilt_with_another_metric(grid):
    report = sweep.write_report(grid, metric="eval_loss", higher=False)
    rows = [r for r in report["jobs"] if r["status"] == "ok"]
    assert report["best"]["job"] == min(rows, key=lambda r: r["final_eval_loss"])["job"]


def test_any_logged_metric_picks_the_best_job(grid, capsys):
    assert sweep.main([str(grid), "--metric", "eval_logps/chosen"]) == 0
    report = json.loads((grid / "sweep_summary.json").read_text())
    values = {r["job"]: r["final_eval_logps/chosen"] for r in report["jobs"]}
    assert report["best"]["job"] == max(values, key=values.get) and None not in values.values()
    assert "best: job" in capsys.readouterr().out
    sweep.write_report(grid)  # back to the default for the other tests


def test_the_report_command_checks_its_sweep_dir_and_metric(grid, tmp_path, capsys):
    assert sweep.main([str(tmp_path)]) == 2  # no job dirs: not a sweep
    assert "is not a sweep dir" in capsys.readouterr().err
    assert not (tmp_path / "sweep_summary.csv").exists()
    assert sweep.main([str(grid), "--metric", "eval_rewards/acuracies"]) == 2
    assert "did you mean 'eval_rewards/accuracies'?" in capsys.readouterr().err
    assert sweep.main([str(grid), "--metric", "eval_loss", "--lower"]) == 0
    assert "ARGS" in (ROOT / "Makefile").read_text().split("sweep-report:")[1].split("\n\n")[0]


def test_a_failed_job_is_listed_and_the_rest_still_run(tmp_path):
    out = multirun(tmp_path / "s", "train.beta=0.1", "train.max_length=256,5")
    assert out.returncode == 1 and "failed" in out.stderr
    rows = read_csv(tmp_path / "s" / "sweep_summary.csv")
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "max_length=5" in rows[1]["error"] and rows[1]["final_loss"] == ""
    assert (tmp_path / "s" / "sweep_curves.png").exists()


def test_a_rerun_sweep_skips_finished_jobs_and_resumes_the_others(tmp_path):
    grid = ["train.beta=0.1,0.2", "++train.save_strategy=steps", "++train.save_steps=3"]
    assert multirun(tmp_path / "s", *grid).returncode == 0
    done, stopped = sorted(p for p in (tmp_path / "s").iterdir() if p.is_dir())
    summary = stopped / "dpo_metrics" / "summary.json"  # as a job stopped by SIGTERM at step 3 leaves it:
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "interrupted", "steps": 3}))
    shutil.rmtree(stopped / "checkpoint-6")
    assert [r["status"] for r in sweep.write_report(tmp_path / "s")["jobs"]] == ["ok", "interrupted"]
    untouched = {p: p.stat().st_mtime_ns for p in done.rglob("*")}

    out = multirun(
        tmp_path / "s", *grid, "run.resume=auto", own_process=True
    )  # make sweep RESUME=auto: the same job dirs
    assert out.returncode == 0, out.stderr[-3000:]
    assert "job 0: finished in an earlier launch, skipped" in out.stdout
    assert f"resuming from {stopped / 'checkpoint-3'}" in out.stdout
    assert {p: p.stat().st_mtime_ns for p in done.rglob("*")} == untouched
    assert [r["status"] for r in read_csv(tmp_path / "s" / "sweep_summary.csv")] == ["ok", "ok"]
    assert json.loads((stopped / "dpo_metrics" / "summary.json").read_text())["steps"] == 6

    other = multirun(
        tmp_path / "s", *grid, "dataset.max_samples=32", own_process=True
    )  # another experiment, same dirs
    assert other.returncode == 2 and "dataset.max_samples: 64 -> 32" in other.stderr
    assert "run.allow_changes=true" in other.stderr and not list((tmp_path / "s").glob("*/job_status.json"))
    assert {p: p.stat().st_mtime_ns for p in done.rglob("*")} == untouched

    again = multirun(
        tmp_path / "s", *grid, "run.overwrite=true", own_process=True
    )  # both replaced, in the same dirs
    assert again.returncode == 0 and "skipped" not in again.stdout, again.stderr[-3000:]
    assert sorted(p for p in (tmp_path / "s").iterdir() if p.is_dir()) == [done, stopped]
    assert [r["status"] for r in read_csv(tmp_path / "s" / "sweep_summary.csv")] == ["ok", "ok"]
    for job_dir in (done, stopped):  # each with the record of the launch that replaced it
        assert "++run.overwrite=True" in yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        assert not (job_dir / ".hydra" / "relaunched").exists()  # the replaced run's relaunch went with it


def test_jobs_in_one_process_free_their_models(tmp_path):
    refs = []
    for i in range(2):
        cfg, recipe = config.compose(tiny_overrides("tiny_lora_dpo"))
        trainer = train.run(cfg, tmp_path / str(i), recipe)
        refs.append(weakref.ref(trainer.model))
        del trainer
        gc.collect()
    assert all(ref() is None for ref in refs)


def test_jobs_run_through_submitit_local(tmp_path):
    """Each job in a process of its own, as on a cluster; two suffice to show the report gathers them."""
    out = multirun(tmp_path / "s", "train.beta=0.1,0.2", "hydra/launcher=submitit_local", own_process=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_csv(tmp_path / "s" / "sweep_summary.csv")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "slurm"])
def test_launchers_compose(launcher):
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert get_class(cfg.hydra.launcher._target_)
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 720
        assert cfg.hydra.launcher.partition


def test_peak_memory_does_not_grow_with_the_number_of_jobs(grid):
    peaks = [
        json.loads(p.read_text())["peak_rss_mb"] for p in sorted(grid.glob("*/dpo_metrics/summary.json"))
    ]
    assert len(peaks) == 4 and peaks[-1] <= peaks[0] * 1.1  # one process ran all four jobs


def test_sweeps_over_losses_and_recipes(tmp_path):
    out = multirun(tmp_path / "s", "recipes=tiny_lora_dpo,tiny_full_dpo", "loss=sigmoid,ipo")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_csv(tmp_path / "s" / "sweep_summary.csv")
    assert {(r["recipes"], r["loss"]) for r in rows} == {
        (recipe, loss) for recipe in ("tiny_lora_dpo", "tiny_full_dpo") for loss in ("sigmoid", "ipo")
    }
    assert {r["status"] for r in rows} == {"ok"}


def test_a_kto_sweep_reports_its_jobs(tmp_path):
    """KTO rates each answer alone (it logs no preference accuracy): with the report's defaults its jobs
    are ranked by the eval reward margin, and the rebuilt report picks the same job."""
    out = multirun(tmp_path / "kto", "recipes=tiny_kto", "train.beta=1.0,2.0")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "kto" / "sweep_summary.json").read_text())
    assert [r["status"] for r in report["jobs"]] == ["ok", "ok"] and report[
        "metric"
    ] == "eval_rewards/margins"
    margins = [r["final_eval_rewards/margins"] for r in report["jobs"]]
    assert report["best"]["job"] == margins.index(max(margins))
    assert sweep.main([str(tmp_path / "kto")]) == 0
    assert (
        json.loads((tmp_path / "kto" / "sweep_summary.json").read_text())["best"]["job"]
        == report["best"]["job"]
    )
