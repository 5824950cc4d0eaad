"""This launch's decision on its run dir (planning.py's `plan`, made once before Hydra starts) and the
acts that carry it out. Whatever acts on a run dir reads that plan: the relaunch
that continues a run, Hydra's record of the launch, replacing a run, skipping a sweep's finished job,
the checkpoint to resume from, and cleaning up after a launch that failed before training.

Each launch of a run is recorded in its own folder: the first in `.hydra/`, later ones in
`.hydra/relaunched/<time>/`, each with Hydra's files (the overrides it ran with, its composed config)
and `launch.yaml` (processes, nodes, hardware option). A relaunch starts from the newest record, so a
change once allowed stays allowed.
"""

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from dpo_recipes import config
from dpo_recipes.rundir.paths import HYDRA_FILES, LAUNCH, LOCK, RECORD, written
from dpo_recipes.rundir.planning import Flags, Plan, key, locked, plan, rank, snapshot, world


def clear(run_dir: Path) -> None:
    """Remove what an earlier run wrote (WRITTEN: weights, tokenizer, checkpoints, metrics, exports, its
    records), keeping the record Hydra has just written for this launch in `.hydra/` and this lock."""
    for path in (p for p in run_dir.iterdir() if written(p.name) and p.name != LOCK):
        inside = list(path.iterdir()) if path.name == RECORD else [path]
        for old in (p for p in inside if not (path.name == RECORD and p.name in HYDRA_FILES)):
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def start(plan: Plan, launch: dict) -> None:
    """Act on the plan once Hydra recorded the launch (the first process only): replace the earlier run,
    note this launch's processes, record allowed changes."""
    if rank() != 0:
        return
    if plan.action == "replace":
        clear(plan.dir)
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "launch": os.environ.get("DPO_RUN_STAMP")}
    plan.dir.mkdir(parents=True, exist_ok=True)
    (plan.dir / LOCK).write_text(json.dumps({**lock, "since": now()}))
    if plan.record:
        (plan.dir / plan.record).mkdir(parents=True, exist_ok=True)
        (plan.dir / plan.record / LAUNCH).write_text(yaml.safe_dump(launch, sort_keys=False))
    if plan.changes:
        record = plan.dir / f"changes_{time.strftime('%Y-%m-%d_%H-%M-%S')}.yaml"
        record.write_text(
            yaml.safe_dump({"overrides": plan.overrides, "changes": plan.changes}, sort_keys=False)
        )
        print(f"resuming {plan.dir} with run.allow_changes=true; the changes are in {record}")


def release(run_dir: Path) -> None:
    """The launch is done with its dir (the first process, however the run ended)."""
    if rank() == 0 and locked(run_dir)[1].get("pid") == os.getpid():
        (run_dir / LOCK).unlink(missing_ok=True)


def discard(plan: Plan) -> None:
    """A launch that failed before training leaves nothing behind: a new run's dir holding only its
    record goes, and so does a relaunch's record (the next relaunch chains from the one before)."""
    if rank() != 0 or not plan.record or not plan.dir.is_dir():
        return
    if plan.action == "resume" and plan.record != RECORD:
        shutil.rmtree(plan.dir / plan.record, ignore_errors=True)
        return
    files = {p.relative_to(plan.dir).as_posix() for p in plan.dir.rglob("*") if p.is_file()}
    if files <= {f"{RECORD}/{name}" for name in (*HYDRA_FILES, LAUNCH)} | {LOCK}:
        shutil.rmtree(plan.dir)
        here = Path.cwd()  # and the folders above it (outputs/<recipe>/) where it was all they held
        for folder in plan.dir.absolute().parents:
            if here not in folder.parents:
                break
            with contextlib.suppress(OSError):  # not empty
                folder.rmdir()


# The plan of each run dir this process launches into, made once: by decide() before Hydra starts a run,
# or by Hydra's record resolver for a sweep's job; main() and train.run() read it from here.
PLANS: dict[Path, Plan] = {}
TRAINED: set[Path] = set()  # run dirs whose training began in this process


def now() -> str:
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def decide(overrides: list[str], processes: int | None = None, first_node: bool = True) -> Plan:
    """The plan of `python -m dpo_recipes.train` with these overrides (one run, not a sweep): the run dir
    they name (one launch time for every process), compared with what it holds. `processes`: the
    launch's processes x nodes, where this process is not one of them (the launcher)."""
    os.environ.setdefault("DPO_RUN_STAMP", now())  # this compose and Hydra's name the same dir
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    first = rank() == 0  # the others follow its record and its refusal
    composed = (lambda o: OmegaConf.to_container(config.compose(o)[0])) if first else None
    run_dir = Path(cfg.hydra.run.dir).absolute()
    flags = Flags(str(cfg.run.resume), bool(cfg.run.overwrite), bool(cfg.run.allow_changes))
    snap = snapshot(run_dir, first_node)
    PLANS[run_dir] = plan(snap, flags, overrides, composed, processes or world(), stamp=now())
    return PLANS[run_dir]


def sweep_changes(overrides: list[str]) -> str | None:
    """Why a sweep launched into an earlier sweep's dir (`hydra.sweep.dir=...`) must not run: its
    overrides differ from that launch's (Hydra's multirun.yaml), so new jobs would join the old ones in
    one report. None when they match, the dir is new, or `run.allow_changes=true` is given."""
    settings = {key(o): o.split("=", 1)[1] for o in overrides if "=" in o}
    record = Path(settings.get("hydra.sweep.dir", "")) / "multirun.yaml"
    if "hydra.sweep.dir" not in settings or not record.is_file():
        return None
    earlier = yaml.safe_load(record.read_text())["hydra"]["overrides"]["task"]
    before = {key(o): o.split("=", 1)[1] for o in earlier if "=" in o}
    ours = [k for k in {**before, **settings} if not k.startswith(("hydra", "run."))]
    found = [
        f"{k}: {before.get(k, '(unset)')} -> {settings.get(k, '(unset)')}"
        for k in ours
        if before.get(k) != settings.get(k)
    ]
    if not found or settings.get("run.allow_changes", "").lower() == "true":
        return None
    return (
        f"{record.parent} holds a sweep launched with other overrides: {'; '.join(found)}. One report would "
        "mix two experiments: sweep into a new dir (no SWEEP_DIR), or pass run.allow_changes=true"
    )


def fresh(run_dir: Path, run, sweep: bool = False, compose=None) -> Plan:
    """A plan made now from what the dir holds: a sweep's job compares its own config (`compose`) with
    the job's earlier one; a run from Python compares nothing."""
    flags = Flags(str(run.resume), bool(run.overwrite), bool(run.allow_changes))
    return plan(snapshot(Path(run_dir).absolute()), flags, [], compose, world(), sweep, now())


def planned(run_dir: Path, run, sweep: bool = False, compose=None) -> Plan:
    """This launch's plan for `run_dir`: the one made before Hydra started, else one made now."""
    run_dir = Path(run_dir).absolute()
    if run_dir not in PLANS:
        PLANS[run_dir] = fresh(run_dir, run, sweep, compose)
    return PLANS[run_dir]


def record_of(run_dir: str, overwrite: bool, resume: str, allow_changes: bool = False, *, _root_=None):
    """Where Hydra records this launch (`hydra.output_subdir`): the plan's record, on the first process
    only, so that ranks never race on it. A sweep's job plans with its own composed config (`_root_`,
    the job's config as OmegaConf hands it to a resolver)."""
    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if rank() != 0:
        return None
    compose = None
    if sweep and _root_ is not None:
        job = {k: v for k, v in OmegaConf.to_container(_root_, resolve=False).items() if k != "hydra"}
        compose = lambda _: job  # noqa: E731  (a job compares the config it was composed with)
    return planned(
        Path(run_dir), Flags(str(resume), bool(overwrite), bool(allow_changes)), sweep, compose
    ).record


# Hydra records each launch where the plan says (conf/train.yaml: hydra.output_subdir)
OmegaConf.register_new_resolver("dpo_record", record_of, replace=True)
