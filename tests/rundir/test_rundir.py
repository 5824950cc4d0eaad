"""The run dir's one owner: plan() as a truth table, the relaunch chain, replace means replace, a failed
launch leaves nothing, the final save (FSDP gathers a full state dict; finished only with weights)."""

import json
import os
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from dpo_recipes import config, errors
from dpo_recipes.rundir import launching, paths, planning
from dpo_recipes.rundir.planning import Flags, Launch, Snapshot
from dpo_recipes.training import stopping

DIR = Path("/runs/r")
CK = {n: DIR / f"checkpoint-{n}" for n in (10, 20, 30)}
FIRST = Launch(
    ["recipes=tiny", "++train.learning_rate=0.001", "++run.resume=never"],
    {"train": {"learning_rate": 0.001}},
    1,
)
ALLOWED = Launch(
    ["recipes=tiny", "++train.learning_rate=0.01", "++run.allow_changes=true"],
    {"train": {"learning_rate": 0.01}},
    1,
)
EMPTY = Snapshot(DIR)
RECORDED = Snapshot(DIR, latest=FIRST, recorded=True)  # a launch that failed before training
STARTED = Snapshot(DIR, None, True, (CK[10], CK[20]), (CK[30],), FIRST, True)
METRICS_ONLY = Snapshot(DIR, None, True, (), (), FIRST, True)
INTERRUPTED = Snapshot(DIR, "interrupted", True, (CK[10],), (), FIRST, True)
FINISHED = Snapshot(DIR, "finished", True, (CK[10],), (), FIRST, True)
CHAINED = Snapshot(DIR, None, True, (CK[10],), (), ALLOWED, True)
UNRECORDED = Snapshot(DIR, None, True, (CK[10],), (), None, False)
LR = ["++train.learning_rate=0.01"]
RELAUNCH = f"{paths.RELAUNCHED}/T"


def composed(overrides: list[str]) -> dict:
    """What Hydra would compose: the train keys the overrides set."""
    keys = [o.lstrip("+").split("=", 1) for o in overrides if o.lstrip("+").startswith("train.")]
    return {"train": {k.removeprefix("train."): float(v) for k, v in keys}}


ROWS = [
    # snapshot, flags, overrides, world, sweep -> action, record, checkpoint
    (EMPTY, Flags(), [], 1, False, "new", ".hydra", None),
    (EMPTY, Flags(resume="/x/checkpoint-5"), [], 1, False, "new", ".hydra", "/x/checkpoint-5"),
    (EMPTY, Flags(overwrite=True), [], 1, False, "new", ".hydra", None),
    (RECORDED, Flags(), LR, 1, False, "new", ".hydra", None),
    (STARTED, Flags(), [], 1, False, "resume", RELAUNCH, str(CK[20])),
    (STARTED, Flags(resume="never"), [], 1, False, "refuse", None, None),
    (STARTED, Flags(resume="/x/checkpoint-5"), [], 1, False, "resume", RELAUNCH, "/x/checkpoint-5"),
    (STARTED, Flags(overwrite=True), [], 1, False, "replace", ".hydra", None),
    (STARTED, Flags(), LR, 1, False, "refuse", None, None),
    (STARTED, Flags(allow_changes=True), LR, 1, False, "resume", RELAUNCH, str(CK[20])),
    (STARTED, Flags(), [], 2, False, "refuse", None, None),
    (STARTED, Flags(allow_changes=True), [], 2, False, "resume", RELAUNCH, str(CK[20])),
    (METRICS_ONLY, Flags(), [], 1, False, "resume", RELAUNCH, None),
    (INTERRUPTED, Flags(), [], 1, False, "resume", RELAUNCH, str(CK[10])),
    (FINISHED, Flags(), [], 1, False, "refuse", None, None),
    (FINISHED, Flags(overwrite=True), [], 1, False, "replace", ".hydra", None),
    (FINISHED, Flags(), ["++train.learning_rate=0.001"], 1, True, "skip", None, None),
    (FINISHED, Flags(), LR, 1, True, "refuse", None, None),  # a sweep re-run with other settings
    (FINISHED, Flags(allow_changes=True), LR, 1, True, "skip", None, None),
    (STARTED, Flags(), LR, 1, True, "refuse", None, None),
    (STARTED, Flags(allow_changes=True), LR, 1, True, "resume", RELAUNCH, str(CK[20])),
    (FINISHED, Flags(overwrite=True), [], 1, True, "replace", ".hydra", None),
    (CHAINED, Flags(), [], 1, False, "resume", RELAUNCH, str(CK[10])),
    (UNRECORDED, Flags(), LR, 1, False, "resume", ".hydra", str(CK[10])),
]


@pytest.mark.parametrize("snap,flags,overrides,world,sweep,action,record,checkpoint", ROWS)
def test_plan_truth_table(snap, flags, overrides, world, sweep, action, record, checkpoint):
    got = planning.plan(snap, flags, overrides, composed, world, sweep, "T")
    assert (got.action, got.record, got.checkpoint) == (action, record, checkpoint)
    assert got.dir == DIR and bool(got.message) == (
        action in ("refuse", "skip", "replace") or snap is STARTED
    )


def test_plan_messages_name_the_fix():
    def message(snap, flags=None, overrides=(), world=1):
        return planning.plan(snap, flags or Flags(), list(overrides), composed, world, False, "T").message

    assert "already holds a finished run; pick another name (RUN=...) or pass run.overwrite=true" in message(
        FINISHED
    )
    assert "run.resume=never" in message(STARTED, Flags(resume="never"))
    refused = message(STARTED, overrides=LR)
    assert "train.learning_rate: 0.001 -> 0.01" in refused and "run.allow_changes=true" in refused
    assert "its own overrides are kept: recipes=tiny train.learning_rate=0.001" in refused
    assert "processes x nodes: 1 -> 2 (global batch 8 -> 16)" in message(STARTED, world=2)
    assert message(STARTED) == f"skipping {CK[30]}: incomplete (the run stopped while writing it)"


def test_a_change_that_cannot_take_effect_mid_run_is_refused_even_when_allowed():
    def nodes(overrides):  # the model keys the overrides set, beside composed()'s train keys
        model = dict(o.lstrip("+").removeprefix("model.").split("=", 1) for o in overrides if "model." in o)
        return {**composed(overrides), "model": model}

    started = Snapshot(DIR, None, True, (CK[10],), (), Launch(["recipes=tiny"], nodes([]), 1), True)
    plan = planning.plan(started, Flags(allow_changes=True), ["++model.lora_r=8", *LR], nodes, 1, False, "T")
    assert (
        plan.action == "refuse" and "these cannot change mid-run: model.lora_r: (unset) -> 8" in plan.message
    )
    assert "train.learning_rate" not in plan.message.split("mid-run:")[1]  # that one can
    allowed = planning.plan(started, Flags(allow_changes=True), LR, nodes, 1, False, "T")
    assert allowed.action == "resume" and allowed.changes == ["train.learning_rate: (unset) -> 0.01"]


def test_a_resume_runs_with_the_latest_launchs_overrides_and_this_ones_on_top():
    resumed = planning.plan(STARTED, Flags(allow_changes=True), ["++train.beta=0.2"], composed, 1, False, "T")
    assert resumed.overrides == ["recipes=tiny", "++train.learning_rate=0.001", "++train.beta=0.2"]
    assert resumed.changes == ["train.beta: (unset) -> 0.2"]
    chained = planning.plan(CHAINED, Flags(), [], composed, 1, False, "T")  # the allowed lr stays
    assert "++train.learning_rate=0.01" in chained.overrides and not chained.changes
    unchecked = planning.plan(STARTED, Flags(), LR, None, 2, False, "T")  # other ranks follow the first
    assert unchecked.action == "resume" and "++train.learning_rate=0.01" in unchecked.overrides


def record(run_dir: Path, where: str, overrides: list[str], world: int = 1) -> None:
    """A launch's record as Hydra and launching.start write it."""
    folder = run_dir / where
    folder.mkdir(parents=True)
    cfg, _ = config.compose(overrides)
    OmegaConf.save(cfg, folder / "config.yaml")
    (folder / "overrides.yaml").write_text(yaml.safe_dump(config.plain_keys(overrides)))
    (folder / paths.LAUNCH).write_text(yaml.safe_dump({"world_size": world}))


def test_relaunches_chain_from_the_latest_accepted_launch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    first = ["recipes=tiny_lora_dpo", "train.learning_rate=1e-3", f"hydra.run.dir={run_dir}"]
    record(run_dir, ".hydra", first)
    (run_dir / "checkpoint-10").mkdir()
    hint = ["recipes=tiny_lora_dpo", f"hydra.run.dir={run_dir}"]
    assert (
        launching.decide(config.plain_keys([*hint, "train.learning_rate=0.01"])).action == "refuse"
    )  # a changed lr ...
    allowed = launching.decide(
        config.plain_keys([*hint, "train.learning_rate=0.01", "run.allow_changes=true"])
    )
    assert allowed.action == "resume" and "++train.learning_rate=0.01" in allowed.overrides
    record(run_dir, allowed.record, allowed.overrides)  # ... allowed, it trains, it crashes
    again = launching.decide(config.plain_keys(hint))  # the plain hint
    assert again.action == "resume" and "++train.learning_rate=0.01" in again.overrides and not again.changes
    monkeypatch.setenv("WORLD_SIZE", "2")  # another process count changes the global batch
    other = launching.decide(config.plain_keys(hint))
    assert other.action == "refuse" and "processes x nodes: 1 -> 2 (global batch 8 -> 16)" in other.message
    launching.PLANS.clear()


def test_replace_removes_everything_the_earlier_run_wrote(tmp_path):
    run_dir = tmp_path / "run"
    earlier = [
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "changes_2026.yaml",
        "checkpoint-5/trainer_state.json",
        "dpo_metrics/summary.json",
        "export/model.safetensors",
        ".hydra/relaunched/t/overrides.yaml",
        ".hydra/launch.yaml",
    ]
    for name in [*earlier, ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"]:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("x")
    (run_dir / "dpo_metrics/summary.json").write_text(json.dumps({"status": "finished"}))
    plan = planning.plan(planning.snapshot(run_dir), Flags(overwrite=True), [], None, 1, False, "T")
    launching.start(plan, {"world_size": 1})
    left = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    kept = [".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/launch.yaml", ".hydra/overrides.yaml"]
    assert left == [*kept, paths.LOCK]  # this launch holds the dir until it ends
    launching.release(run_dir)
    assert not (run_dir / paths.LOCK).exists()


def finished_run(run_dir: Path, *others: str) -> None:
    for name in ["dpo_metrics/summary.json", "adapter_model.safetensors", *others]:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(json.dumps({"status": "finished"}))


def test_overwrite_refuses_a_dir_holding_what_no_run_writes_and_keeps_it(tmp_path):
    run_dir = tmp_path / "project"
    finished_run(run_dir, ".git/HEAD", "notes.txt", "data/prefs.jsonl")
    plan = planning.plan(planning.snapshot(run_dir), Flags(overwrite=True), [], None, 1, False, "T")
    assert plan.action == "refuse"
    assert "run.overwrite=true removes only what runs write" in plan.message
    assert "also holds .git, data, notes.txt: move that out" in plan.message
    assert (run_dir / ".git/HEAD").exists() and (run_dir / "dpo_metrics/summary.json").exists()


def lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    held = {"host": host or socket.gethostname(), "pid": pid, "launch": "L", "since": "T0"}
    (run_dir / paths.LOCK).write_text(json.dumps(held))


def test_a_live_launch_holds_its_dir_and_a_gone_ones_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        for pid, host in ((live.pid, None), (1234, "another-host")):
            lock(tmp_path / "held", pid, host)
            plan = planning.plan(planning.snapshot(tmp_path / "held"), Flags(), [], None, 1, False, "T")
            assert plan.action == "refuse" and "is in use by another launch" in plan.message
            assert f"pid {pid}, since T0" in plan.message and paths.LOCK in plan.message
        lock(tmp_path / "stale", gone.pid)
        plan = planning.plan(planning.snapshot(tmp_path / "stale"), Flags(), [], None, 1, False, "T")
        assert (
            plan.action == "new"
            and f"taking over the lock of a launch that is gone (pid {gone.pid})" in plan.message
        )
        launching.start(plan, {"world_size": 1})
        assert json.loads((tmp_path / "stale" / paths.LOCK).read_text())["pid"] == os.getpid()
    finally:
        live.kill()


def test_a_second_launch_into_a_live_launchs_run_dir_is_refused(tmp_path):
    import subprocess
    import sys

    from conftest import python_m

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock(tmp_path / "run", live.pid)
        out = python_m("dpo_recipes.train", f"hydra.run.dir={tmp_path / 'run'}", "train.max_steps=1")
    finally:
        live.kill()
    assert out.returncode == 2 and "is in use by another launch" in out.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [paths.LOCK]


def test_a_launch_that_fails_before_training_leaves_nothing_behind(tmp_path, monkeypatch):
    """Its dir goes, and the folders above it that held nothing else, up to the working dir only."""
    (tmp_path / "work/outputs/other_recipe").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    for new in (Path("outputs/tiny/new"), Path("outputs/tiny/later"), tmp_path / "away" / "new"):
        (new / ".hydra").mkdir(parents=True)
        (new / ".hydra/config.yaml").write_text("x")
    launching.discard(planning.Plan("new", Path("outputs/tiny/new"), record=".hydra"))
    assert sorted(p.name for p in Path("outputs/tiny").iterdir()) == ["later"]
    launching.discard(planning.Plan("new", Path("outputs/tiny/later"), record=".hydra"))
    assert sorted(p.name for p in Path("outputs").iterdir()) == ["other_recipe"]
    launching.discard(planning.Plan("new", tmp_path / "away" / "new", record=".hydra"))
    assert not (tmp_path / "away" / "new").exists() and (tmp_path / "away").is_dir()  # not the working dir's
    relaunched = tmp_path / "old"
    (relaunched / "checkpoint-10").mkdir(parents=True)
    (relaunched / ".hydra/relaunched/t").mkdir(parents=True)
    launching.discard(planning.Plan("resume", relaunched, record=".hydra/relaunched/t"))
    assert not (relaunched / ".hydra/relaunched/t").exists() and (relaunched / "checkpoint-10").exists()


class FakeTrainer:
    def __init__(self, out: Path, fsdp: bool, writes: tuple[str, ...]):
        self.args, self.is_fsdp_enabled, self.writes = SimpleNamespace(output_dir=str(out)), fsdp, writes
        self.asked = []
        plugin = SimpleNamespace(set_state_dict_type=self.asked.append)
        self.accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))

    def save_model(self, out):
        for name in self.writes:
            (Path(out) / name).write_text("x")

    def is_world_process_zero(self):
        return True


def test_the_final_save_gathers_a_full_state_dict_under_fsdp(tmp_path):
    fsdp = FakeTrainer(tmp_path, True, ("model.safetensors", "tokenizer_config.json"))
    assert stopping.save(fsdp) == [] and fsdp.asked == ["FULL_STATE_DICT"]
    ddp = FakeTrainer(tmp_path, False, ())
    assert stopping.save(ddp) == [] and ddp.asked == []


def test_a_run_is_finished_only_with_its_weights_and_tokenizer_on_disk(tmp_path):
    nothing = FakeTrainer(tmp_path / "a", True, ())
    (tmp_path / "a").mkdir()
    assert stopping.save(nothing) == ["weights", "tokenizer"]
    written = []
    metrics = SimpleNamespace(
        write_summary=lambda state, status, **extra: written.append(status) or {"status": status}
    )
    trainer = SimpleNamespace(
        **vars(nothing), state=SimpleNamespace(log_history=[], global_step=4), save_model=nothing.save_model
    )
    trainer.is_world_process_zero = lambda: True
    with pytest.raises(errors.Stopped, match="weights and tokenizer missing after the final save"):
        stopping.finish(
            trainer, metrics, stopping.StopOnSignal(), stopping.StopOnNonFinite(), "tiny_lora_dpo"
        )
    assert written == ["incomplete: weights and tokenizer missing after the final save"]


def test_a_signal_passed_on_by_the_launcher_is_not_a_second_one(monkeypatch, capsys):
    exits, clock = [], [100.0]
    monkeypatch.setattr(stopping.os, "_exit", exits.append)
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    stop = stopping.StopOnSignal()
    stop._handle(signal.SIGINT, None)  # the terminal's Ctrl-C
    clock[0] += 0.5
    stop._handle(signal.SIGTERM, None)  # the launcher passing it on
    assert exits == [] and stop.received == signal.SIGINT
    clock[0] += stop.FORWARDED_WITHIN
    stop._handle(signal.SIGINT, None)  # a second Ctrl-C
    assert exits == [130] and "a checkpoint being written may be incomplete" in capsys.readouterr().err


def test_the_hint_and_the_exit_code_carry_the_launch(monkeypatch, tmp_path):
    from dpo_recipes import launch

    monkeypatch.setenv("DPO_LAUNCH", "HARDWARE=cpu NPROC=2")
    assert stopping.hint("tiny_lora_dpo", Path("/o/r")).startswith(
        "make train RECIPE=tiny_lora_dpo RUN=r HARDWARE=cpu NPROC=2"
    )
    assert errors.exit_code(errors.Stopped("x", 130)) == 0  # torch's launcher must not report a failure
    (tmp_path / "dpo_metrics").mkdir()
    summary = tmp_path / "dpo_metrics/summary.json"
    for status, extra, code in [
        ("interrupted", {"signal": "SIGTERM"}, 143),
        ("stopped: non-finite", {}, 1),
        ("finished", {}, 0),
    ]:
        summary.write_text(json.dumps({"status": status, **extra}))
        assert launch.outcome(tmp_path, 0, [signal.SIGINT]) == code
    assert launch.outcome(tmp_path / "none", 0, [signal.SIGINT]) == 130  # stopped before training


def test_several_nodes_need_one_run_name():
    from dpo_recipes import launch

    with pytest.raises(errors.ConfigError, match=r"over 2 nodes needs a run name \(RUN=<name>\)"):
        launch.run_dir(["recipes=tiny_lora_dpo"], 2)
    assert launch.main(["--nproc", "2", "--nnodes", "2", "hardware=ddp"]) == 2


def test_a_signal_during_the_final_save_lets_the_save_finish(tmp_path, monkeypatch):
    exits = []
    monkeypatch.setattr(stopping.os, "_exit", exits.append)
    stop, written = stopping.StopOnSignal(), []
    previous = signal.getsignal(signal.SIGINT)
    stop.on_train_begin(None, None, None)

    def save_model(out):  # Ctrl-C arrives while the weights are being written
        signal.raise_signal(signal.SIGINT)
        for name in ("model.safetensors", "tokenizer_config.json"):
            (Path(out) / name).write_text("x")

    trainer = FakeTrainer(tmp_path, False, ())
    trainer.save_model, trainer.state = save_model, SimpleNamespace(log_history=[], global_step=4)
    metrics = SimpleNamespace(
        write_summary=lambda state, status, **extra: written.append(status) or {"status": status}
    )
    stopping.finish(trainer, metrics, stop, stopping.StopOnNonFinite(), "tiny_lora_dpo")
    assert written == ["finished"] and exits == [] and stop.received == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is previous  # the handlers go back once the run has ended
