"""Runs survive crashes: resume after SIGKILL, SIGTERM saves and stops, finished runs are never
overwritten, a non-finite loss stops the run, and written files are atomic."""

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import python_m, tiny_overrides

from data_prep.io import atomic_path
from dpo_recipes import ROOT, config, errors, train
from dpo_recipes.config import schema
from dpo_recipes.rundir import paths

RESUMABLE = [
    "recipes=tiny_lora_dpo",
    "dataset.max_samples=256",
    "dataset.eval_path=null",
    "train.max_steps=40",
    "train.save_steps=10",
    "train.logging_steps=2",
    "train.eval_strategy=no",
    "train.disable_tqdm=true",
]


def launch(run_dir, *overrides, hint=False):
    """The run's first launch, or (hint) the resume hint's: the recipe and the run dir alone."""
    first = RESUMABLE[:1] if hint else RESUMABLE
    cmd = [sys.executable, "-m", "dpo_recipes.train", *first, f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def losses(history, key="loss"):
    return {e["step"]: e[key] for e in history if key in e}


def logged_steps(run_dir) -> list[int]:
    path = run_dir / "dpo_metrics" / "training_metrics.csv"
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("step")]
    return []


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run killed (SIGKILL) after its first checkpoint; resumed with the hint and stopped by SIGTERM a
    few steps on; resumed with the hint again to its end. The same run uninterrupted, in this process."""
    tmp_path = tmp_path_factory.mktemp("killed")
    cfg, recipe = config.compose(RESUMABLE)
    whole = train.run(cfg, tmp_path / "whole", recipe).state.log_history

    run_dir = tmp_path / "killed"
    process = launch(run_dir)
    wait_for(run_dir / "checkpoint-10" / "trainer_state.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert paths.summary(run_dir).get("status") != "finished"
    first_record = (run_dir / ".hydra" / "overrides.yaml").read_text()
    partial = run_dir / "checkpoint-990"  # a checkpoint the process died while writing
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"\0" * 10)

    logged = max(logged_steps(run_dir), default=0)
    resumed = launch(run_dir, hint=True)  # the recipe's own max_steps is 150: the run's 40 must win
    deadline = time.monotonic() + 300
    while max(logged_steps(run_dir), default=0) <= logged:
        assert resumed.poll() is None, resumed.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    resumed.send_signal(signal.SIGTERM)
    term = resumed.communicate(timeout=300)
    saved = [c.name for c in paths.checkpoints(run_dir) if paths.complete(c)]
    terminated = resumed.returncode, *term, saved, paths.summary(run_dir)

    last = launch(run_dir, hint=True)
    out, err = last.communicate(timeout=600)
    assert last.returncode == 0, err[-3000:]
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == first_record
    return run_dir, whole, terminated, out, err


@pytest.mark.e2e
def test_killed_run_resumes_with_the_hint_to_the_same_losses_and_schedule(killed):
    run_dir, whole, (_, out, err, saved, _), _, _ = killed
    assert "skipping" in err and "checkpoint-990: incomplete" in err
    start = int(out.split("resuming from ")[1].split("checkpoint-")[1].split()[0])
    assert start == 10  # the newest complete checkpoint; then the SIGTERM's, then the end
    stop = int(saved[-1].split("-")[1])

    history = json.loads((run_dir / "dpo_metrics" / "log_history.json").read_text())
    for key in ("loss", "learning_rate"):
        got, reference = losses(history, key), losses(whole, key)
        assert max(got) == max(reference) == 40
        for step in (s for s in reference if s > start):
            if key == "loss" and step - 2 < stop < step:  # logged every 2 steps: the mean of those
                continue  # since the resume, one step where the stop fell between two logs
            assert got[step] == pytest.approx(reference[step], abs=1e-4), (key, step)
    with open(run_dir / "dpo_metrics" / "training_metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == sorted(set(steps)) and set(steps) == {
        e["step"] for e in history if "train_runtime" not in e
    }
    assert json.loads((run_dir / "dpo_metrics" / "summary.json").read_text())["status"] == "finished"


@pytest.mark.e2e
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(killed):
    run_dir, _, (code, _, err, saved, summary), out, _ = killed
    assert code == 128 + signal.SIGTERM
    assert "SIGTERM at step" in err and f"make train RECIPE=tiny_lora_dpo RUN={run_dir.name}" in err
    step = int(err.split("SIGTERM at step ")[1].split(":")[0])
    assert saved[-1] == f"checkpoint-{step}"  # complete, beside the incomplete checkpoint-990
    assert summary["status"] == "interrupted" and summary["steps"] == step
    assert f"resuming from {run_dir / f'checkpoint-{step}'}" in out  # the printed hint alone resumed it
    assert json.loads((run_dir / "dpo_metrics" / "summary.json").read_text())["steps"] == 40


@pytest.mark.e2e
def test_finished_run_is_never_overwritten_and_resume_never_refuses(killed, tmp_path):
    run_dir = shutil.copytree(killed[0], tmp_path / "done")  # a finished run
    hydra_config = (run_dir / ".hydra" / "config.yaml").read_text()
    relaunch = ["dpo_recipes.train", *RESUMABLE, f"hydra.run.dir={run_dir}", "train.max_steps=2"]
    again = python_m(*relaunch, "train.beta=0.3")
    err = again.stderr
    assert again.returncode == 2
    assert f"{run_dir} already holds a finished run" in err and "RUN=" in err and "run.overwrite=true" in err
    assert (run_dir / ".hydra" / "config.yaml").read_text() == hydra_config  # Hydra did not rewrite it

    (run_dir / "dpo_metrics" / "summary.json").unlink()  # an unfinished run
    never = python_m(*relaunch, "run.resume=never")
    assert never.returncode == 2 and "run.resume=never" in never.stderr


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_after_writing_metrics(tmp_path):
    # An infinite learning rate makes every weight NaN at the first update (AdamW's decay step multiplies
    # by 1 - inf * 0), on any CPU; a merely huge one stays finite on some kernels.
    cfg, recipe = config.compose(
        tiny_overrides("tiny_lora_dpo", "train.learning_rate=inf", "++train.max_steps=30")
    )
    with pytest.raises(errors.Stopped, match="nan at step"):
        train.run(cfg, tmp_path / "run", recipe)
    metrics = tmp_path / "run" / "dpo_metrics"
    summary = json.loads((metrics / "summary.json").read_text())
    assert summary["status"] == "stopped: non-finite" and summary["steps"] < 30
    assert (metrics / "training_metrics.csv").exists()


def test_atomic_writes_keep_the_previous_version(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "previous" and os.listdir(tmp_path) == ["summary.json"]


def test_an_atomic_folder_replaces_keeps_or_refuses_one_already_there(tmp_path):
    def build(mode, text):
        with atomic_path(tmp_path / "model", existing=mode) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text(text)

    build("replace", "first")
    build("keep", "second")  # a parallel builder finished first: its folder stays
    assert (tmp_path / "model" / "config.json").read_text() == "first"
    with pytest.raises(OSError):
        build("refuse", "third")
    build("replace", "fourth")
    assert (tmp_path / "model" / "config.json").read_text() == "fourth"
    assert os.listdir(tmp_path) == ["model"]  # no staging folder left behind


def test_recipes_load_safetensors_only_and_no_remote_code(tmp_path):
    for recipe in schema.recipes():
        cfg, _ = config.compose([f"recipes={recipe}"])
        built = config.build(cfg, tmp_path, machine=False)  # as the recipe's GPUs build it
        assert built.args.trust_remote_code is False
        assert built.args.model_init_kwargs["use_safetensors"] is True


@pytest.mark.slow
def test_pickle_weights_are_refused_by_default(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_recipes.sources import tiny

    pickled = tmp_path / "pickled"
    AutoModelForCausalLM.from_pretrained(tiny.path()).save_pretrained(pickled)
    AutoTokenizer.from_pretrained(tiny.path()).save_pretrained(pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    cfg, recipe = config.compose(
        tiny_overrides("tiny_lora_dpo", f"model.model_name_or_path={tmp_path / 'pickled'}")
    )
    with pytest.raises(OSError, match="safetensors"):
        train.run(cfg, tmp_path / "run", recipe)


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["tiny_full_dpo", "tiny_kto", "tiny_orpo"])
def test_full_fine_tuning_and_the_other_methods_resume_to_the_same_losses(method, tmp_path, capsys):
    overrides = [o.replace("recipes=tiny_lora_dpo", f"recipes={method}") for o in RESUMABLE]
    cfg, recipe = config.compose([*overrides, "train.max_steps=20"])
    run_dir = tmp_path / method
    reference = losses(train.run(cfg, run_dir, recipe).state.log_history)
    # Back to the state of a run that died after checkpoint-10: no summary, no later checkpoint.
    (run_dir / "dpo_metrics" / "summary.json").unlink()
    for checkpoint in paths.checkpoints(run_dir)[1:]:
        shutil.rmtree(checkpoint)
    assert [c.name for c in paths.checkpoints(run_dir)] == ["checkpoint-10"]
    capsys.readouterr()
    resumed = losses(train.run(cfg, run_dir, recipe).state.log_history)
    assert f"resuming from {run_dir / 'checkpoint-10'}" in capsys.readouterr().out
    assert max(resumed) == 20  # and Adam's moments and the schedule came back, or later losses would differ
    for step in (s for s in reference if s > 10):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-4)


def logged(run_dir, key: str) -> dict:
    with (run_dir / "dpo_metrics" / "training_metrics.csv").open() as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


@pytest.mark.e2e
def test_an_allowed_learning_rate_change_on_resume_shows_from_the_resumed_step(tmp_path):
    """Resumed from checkpoint-10 with a new peak learning rate (an allowed change): the schedule goes on
    at the same step from the new peak, as the metrics CSV shows; the checkpoint's own would come back."""
    overrides = [*RESUMABLE, "train.max_steps=20", "train.lr_scheduler_type=linear", "train.warmup_steps=0"]
    cfg, recipe = config.compose([*overrides, "train.learning_rate=1e-3"])
    run_dir = tmp_path / "lr"
    train.run(cfg, run_dir, recipe)
    before = logged(run_dir, "learning_rate")
    (run_dir / "dpo_metrics" / "summary.json").unlink()
    for checkpoint in paths.checkpoints(run_dir)[1:]:
        shutil.rmtree(checkpoint)
    cfg, recipe = config.compose([*overrides, "train.learning_rate=5e-3", "train.adam_beta1=0.5"])
    trainer = train.run(cfg, run_dir, recipe)
    after = logged(run_dir, "learning_rate")
    assert set(after) == set(before) and max(after) == 20
    for step in after:  # up to the checkpoint as logged then, from it the new peak on the same schedule
        expected = before[step] * (5 if step > 10 else 1)
        assert after[step] == pytest.approx(expected, rel=1e-6), step
    assert {group["betas"][0] for group in trainer.optimizer.param_groups} == {0.5}


def test_a_launch_that_fails_before_training_leaves_no_run_dir(tmp_path):
    out = python_m("dpo_recipes.train", f"hydra.run.dir={tmp_path / 'typo'}", "train.bta=1")
    assert out.returncode == 2 and "did you mean 'beta'" in out.stderr
    assert not (tmp_path / "typo").exists()


@pytest.mark.e2e
def test_an_interrupt_during_start_up_exits_130_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "dpo_recipes.train", f"hydra.run.dir={tmp_path}"]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # the libraries are still loading: training starts seconds later
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err
    assert "SIGINT outside the training loop: stopped" in err
