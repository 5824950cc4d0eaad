"""The end of a run: the verdict block every run prints last (finished, interrupted, failed), with the
numbers of its summary.json, the same block in summary.md, and next commands that run as printed."""

import json
import re
import signal
import subprocess

import pytest
from conftest import python_m, run, tiny_overrides

from dpo_recipes import ROOT
from dpo_recipes.rundir import paths
from dpo_recipes.training import stopping, verdict

# The tiny recipe's smoke run, evaluated at every step: an interrupted run has eval numbers too
OVERRIDES = [*(o for o in tiny_overrides("tiny_lora_dpo") if "eval_steps" not in o), "++train.eval_steps=1"]


def block(printed: str) -> list[str]:
    lines = printed.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("== run "))
    return lines[start:]


def agrees_with_summary(lines: list[str], run_dir) -> dict:
    summary = paths.summary(run_dir)
    assert lines[0] == f"== run {summary['status']}: tiny_lora_dpo, {summary['steps']} steps =="
    for name in ("eval_rewards/accuracies", "eval_rewards/margins"):
        best = summary["best"][name]
        said = (
            f"  {name}: final {summary['final'][name]:.4g}, best {best['value']:.4g} at step {best['step']}"
        )
        assert said in lines
    flags = [f["flag"] for f in summary["health"]]
    assert f"  health: {'; '.join(flags) if flags else 'no health flags'}" in lines
    assert f"  files: {run_dir} (metrics, curves and summary in {run_dir / paths.METRICS})" in lines
    text = (paths.metrics_dir(run_dir) / paths.SUMMARY_TEXT).read_text()
    assert text.startswith(f"# {lines[0].strip('= ')}") and all(line in text for line in lines[1:])
    return summary


@pytest.mark.e2e
def test_a_finished_run_ends_with_its_verdict_and_next_commands_that_run(tmp_path):
    run_dir = tmp_path / "cli"
    out = python_m("dpo_recipes.train", *OVERRIDES, f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = block(out.stdout)
    agrees_with_summary(lines, run_dir)
    commands = lines[lines.index("next:") + 1 :]
    assert [c.split()[:2] for c in commands] == [["make", "samples"], ["make", "eval"], ["make", "export"]]
    for command in commands:  # what make would run: the target's module on this run dir
        dry = subprocess.run([*command.split(), "-n"], cwd=ROOT, capture_output=True, text=True, check=True)
        assert (
            f"-m dpo_recipes.after.{command.split()[1].replace('eval', 'evaluate')} '{run_dir}'" in dry.stdout
        )
    exported = subprocess.run(commands[-1].split(), cwd=ROOT, capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (run_dir / paths.EXPORT / "README.md").exists()


@pytest.mark.e2e
def test_an_interrupted_run_ends_with_its_verdict_and_the_resume_that_finishes_it(tmp_path, monkeypatch):
    step_end = stopping.StopOnSignal.on_step_end

    def ctrl_c_at_step_one(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self._handle(signal.SIGINT, None)  # what a terminal's Ctrl-C does
        return step_end(self, args, state, control, **kwargs)

    run_dir = tmp_path / "cli"
    monkeypatch.setattr(stopping.StopOnSignal, "on_step_end", ctrl_c_at_step_one)
    out = python_m("dpo_recipes.train", *OVERRIDES, f"hydra.run.dir={run_dir}")
    assert out.returncode == 130, out.stderr[-2000:]
    lines = block(out.stdout)
    assert agrees_with_summary(lines, run_dir)["status"] == "interrupted"
    resume = re.fullmatch(r'resume: make train RECIPE=tiny_lora_dpo RUN=cli  \(or ARGS="(.+)"\)', lines[-1])
    assert resume and resume.group(1) == f"hydra.run.dir={run_dir}"
    monkeypatch.setattr(stopping.StopOnSignal, "on_step_end", step_end)
    again = python_m("dpo_recipes.train", *OVERRIDES, resume.group(1))
    assert again.returncode == 0 and block(again.stdout)[0] == "== run finished: tiny_lora_dpo, 2 steps =="


@pytest.mark.slow
def test_a_failed_run_ends_with_its_verdict_and_says_so_in_its_summary(tmp_path, monkeypatch, capsys):
    def fails(self, args, state, control, **kwargs):
        raise RuntimeError("the accelerator fell off the bus")

    monkeypatch.setattr(stopping.StopOnSignal, "on_step_end", fails)
    with pytest.raises(RuntimeError, match="fell off the bus"):
        run(tmp_path, tiny_overrides("tiny_lora_dpo"))
    lines = block(capsys.readouterr().out)
    summary = paths.summary(tmp_path / "run")
    assert summary["status"] == "failed: RuntimeError: the accelerator fell off the bus"
    assert lines[0] == f"== run {summary['status']}: tiny_lora_dpo, {summary['steps']} steps =="
    assert "  health: no health flags" in lines and not any(line.startswith("next:") for line in lines)


def test_a_reward_models_verdict_names_its_own_metrics_and_what_it_is_for(tmp_path):
    summary = {
        "status": "finished", "recipe": "tiny_reward_model", "steps": 40, "task": "reward",
        "final": {"eval_accuracy": 0.9, "eval_margin": 1.5}, "best": {"eval_accuracy": {"value": 0.95, "step": 20}},
        "health": [{"flag": "loss_flat"}], "memory": {"predicted_peak_mb": 2048, "measured_peak_mb": 1024,
                                                     "measured_by": "MemTracker, steps 1-2"},
    }  # fmt: skip
    lines = verdict.lines(summary, tmp_path / "run")
    assert "  eval_accuracy: final 0.9, best 0.95 at step 20" in lines and "  eval_margin: final 1.5" in lines
    assert "  health: loss_flat" in lines
    assert "  peak memory: predicted 2.00 GiB, measured 1.00 GiB (MemTracker, steps 1-2)" in lines
    assert lines[-1] == f"  make export RUN={tmp_path / 'run'}" and "--judge" in lines[-2]
    del summary["final"]
    assert "  no eval metrics logged" in verdict.lines(summary, tmp_path)[1]


def test_paths_under_the_current_directory_are_shown_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = verdict.lines({"status": "finished", "recipe": "r", "steps": 1}, tmp_path / "outputs" / "r" / "t")
    assert lines[-3:] == [f"  make {verb} RUN=outputs/r/t" for verb in ("samples", "eval", "export")]
    assert json.dumps(lines)  # plain strings
