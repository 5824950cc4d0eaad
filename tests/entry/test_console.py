"""What a default run prints: no third-party warning known to be harmless, no raw log dicts, one
progress bar; DPO_RECIPES_VERBOSE=1 (make train VERBOSE=1) shows all of it."""

import os
import re
import subprocess
import sys

import pytest

from dpo_recipes import ROOT, console

pytestmark = pytest.mark.e2e
SHORT = ["train.max_steps=2", "train.eval_steps=2", "train.logging_steps=1", "dataset.max_samples=64"]


def train(run_dir, verbose: str) -> tuple[list[str], list[str]]:
    """The default recipe as `make train` runs it, shortened; what it printed to stdout, and to both
    streams with a line per bar update."""
    command = [sys.executable, "-m", "dpo_recipes.train", *SHORT, "dataset.max_eval_samples=16"]
    env = {**os.environ, console.VERBOSE: verbose}
    out = subprocess.run(
        [*command, f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines(), (out.stdout + out.stderr).replace("\r", "\n").splitlines()


def test_a_default_run_prints_no_third_party_warning_and_verbose_shows_them(tmp_path):
    stdout, printed = train(tmp_path / "quiet", "0")
    theirs = [line for line in printed if "warning" in line.lower() and not line.startswith("warning: ")]
    assert theirs == [] and not any("Traceback" in line for line in printed)
    assert not any(line.startswith("{'loss'") for line in printed)  # the numbers sit beside the bar
    assert any(re.search(r"2/2 \[.*loss=[\d.]+.*eval acc=[\d.]+, margin=", line) for line in printed)
    assert stdout[-1].startswith("  make export RUN=")  # the verdict block ends the run
    loud = "\n".join(train(tmp_path / "loud", "1")[1])
    for _, message, _, _ in console.WARNINGS[:2]:  # the two every CPU run meets
        assert re.search(message, loud), message
    assert console.RECORDS[0][1] in loud and "{'loss'" in loud
