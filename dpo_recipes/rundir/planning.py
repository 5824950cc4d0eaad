"""What a launch does with its run dir, decided by `plan`, a pure function of what the dir holds
(`snapshot`), the launch's flags and its overrides: start, continue from a checkpoint, replace, skip a
sweep's finished job, or refuse (another live launch holds the dir, the config changed, a finished run)."""

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dpo_recipes.rundir.paths import (
    CONFIG,
    LAUNCH,
    LOCK,
    METRICS,
    OVERRIDES,
    RECORD,
    RELAUNCHED,
    checkpoints,
    complete,
    records,
    step,
    summary,
    written,
)

LAUNCH_ONLY = ("run.resume", "run.overwrite", "run.allow_changes")  # how a launch ran, not the run


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@dataclass(frozen=True)
class Launch:
    """One recorded launch: its overrides, its composed config, its processes x nodes."""

    overrides: list[str]
    config: dict
    world: int


def read_launch(record: Path) -> Launch:
    launch = yaml.safe_load((record / LAUNCH).read_text()) if (record / LAUNCH).exists() else {}
    config = yaml.safe_load((record / CONFIG).read_text()) if (record / CONFIG).exists() else {}
    overrides = yaml.safe_load((record / OVERRIDES).read_text()) or []
    return Launch(overrides, config or {}, int((launch or {}).get("world_size", 1)))


@dataclass(frozen=True)
class Snapshot:
    """What a run dir holds, read once."""

    dir: Path
    status: str | None = None  # summary.json's; None before the run ended once
    started: bool = False  # a checkpoint or metrics exist: the run trained
    complete: tuple[Path, ...] = ()  # complete checkpoints, oldest first
    incomplete: tuple[Path, ...] = ()
    latest: Launch | None = None  # the newest recorded launch
    recorded: bool = False  # the first record exists
    foreign: tuple[str, ...] = ()  # names no run writes (run.overwrite leaves them, so it refuses)
    lock: str | None = None  # held (by another live launch) or stale (its process is gone)
    locker: dict = field(default_factory=dict)  # the lock's host, pid and launch time


def locked(run_dir: Path) -> tuple[str | None, dict]:
    """Whether another launch holds the dir: held (its process lives, or runs on another host) or stale
    (its process is gone); None where no lock is, or this launch holds it (this process, or one launch
    time under several processes). Only the first process reads it: the others follow its plan."""
    try:
        locker = json.loads((run_dir / LOCK).read_text())
    except (OSError, ValueError):
        return None, {}
    same_host, pid = locker.get("host") == socket.gethostname(), int(locker.get("pid", 0))
    launch = os.environ.get("DPO_RUN_STAMP")
    if rank() != 0 or (same_host and pid == os.getpid()) or (world() > 1 and launch == locker.get("launch")):
        return None, locker
    if not same_host:
        return "held", locker
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "stale", locker
    except PermissionError:
        pass
    return "held", locker


def snapshot(run_dir: Path, first_node: bool = True) -> Snapshot:
    """`first_node`: false for another node's launcher, which follows the first node's plan and lock."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return Snapshot(run_dir)
    found = checkpoints(run_dir)
    done = tuple(c for c in found if complete(c))
    launches = records(run_dir)
    return Snapshot(
        dir=run_dir,
        status=summary(run_dir).get("status"),
        started=bool(found) or (run_dir / METRICS).exists(),
        complete=done,
        incomplete=tuple(c for c in found if c not in done),
        latest=read_launch(launches[-1]) if launches else None,
        recorded=(run_dir / RECORD / CONFIG).exists(),
        foreign=tuple(sorted(p.name for p in run_dir.iterdir() if not written(p.name))),
        **dict(zip(("lock", "locker"), locked(run_dir) if first_node else (None, {}), strict=True)),
    )


@dataclass(frozen=True)
class Flags:
    resume: str = "auto"  # auto | never | a checkpoint dir
    overwrite: bool = False
    allow_changes: bool = False


@dataclass(frozen=True)
class Plan:
    """What this launch does with its run dir."""

    action: str  # new | resume | replace | skip | refuse
    dir: Path
    overrides: list[str] = field(default_factory=list)  # the overrides to run with
    record: str | None = None  # where Hydra records this launch, relative to the dir; None: nowhere
    checkpoint: str | None = None  # to resume from
    message: str = ""  # refuse: why and the fix; otherwise what the launch should say
    changes: list[str] = field(default_factory=list)  # allowed changes, recorded in changes_<time>.yaml


def leaves(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for name, value in node.items() for k, v in leaves(value, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): node}


def changes(first: dict, now: dict) -> list[str]:
    """What `now` trains differently from `first` (two composed configs): every leaf but `run.*` and the
    logger, which steer the launch and not what is trained."""
    old, new = leaves(first), leaves(now)
    keys = [k for k in {**old, **new} if not k.startswith(("run.", "logger."))]
    missing = "(unset)"
    return [f"{k}: {old.get(k, missing)} -> {new.get(k, missing)}" for k in keys if old.get(k) != new.get(k)]


# Keys whose change cannot take effect mid-run: the checkpoint holds weights (or an adapter) of the model,
# adapter and task it was started with, and a reference fixed at the start
FIXED = (
    "task", "model.model_name_or_path", "model.model_revision", "model.use_peft", "model.lora_r",
    "model.lora_target_modules", "model.lora_modules_to_save", "model.lora_task_type", "model.use_dora",
    "model.load_in_4bit", "model.load_in_8bit", "reference.strategy", "reference.path",
)  # fmt: skip


def global_batch(config: dict, world: int) -> int:
    train = config.get("train") or {}
    return (
        int(train.get("per_device_train_batch_size", 8))
        * int(train.get("gradient_accumulation_steps", 1))
        * world
    )


def plan(
    snap: Snapshot,
    flags: Flags,
    overrides: list[str],
    compose: Callable[[list[str]], dict] | None = None,
    world: int = 1,
    sweep: bool = False,
    stamp: str = "",
) -> Plan:
    """The one decision about a run dir. `compose` gives the composed config of a list of overrides (a
    sweep's job: its own config; None: compare nothing, as a rank other than the first does); `world` is
    processes x nodes."""
    another = "pick another name (RUN=...)"
    if snap.lock == "held":
        who = snap.locker
        return Plan(
            "refuse",
            snap.dir,
            overrides,
            message=(
                f"{snap.dir} is in use by another launch (host {who.get('host')}, pid {who.get('pid')}, "
                f"since {who.get('since')}): wait for it to end, or {another}; if that launch is gone, "
                f"remove {snap.dir / LOCK}"
            ),
        )
    notes = [f"taking over the lock of a launch that is gone (pid {snap.locker.get('pid')})"] * (
        snap.lock == "stale"
    )
    if flags.overwrite and (snap.started or snap.status):
        if snap.foreign:
            return Plan(
                "refuse",
                snap.dir,
                overrides,
                message=(
                    f"run.overwrite=true removes only what runs write, and {snap.dir} also holds "
                    f"{', '.join(snap.foreign)}: move that out, or {another}"
                ),
            )
        return Plan(
            "replace",
            snap.dir,
            overrides,
            RECORD,
            message="\n".join([*notes, f"replacing the earlier run in {snap.dir}"]),
        )
    sweep_job = sweep and compose is not None and snap.latest is not None and not flags.allow_changes
    if sweep_job and (found := changes(snap.latest.config, compose(overrides))):
        return Plan(
            "refuse",
            snap.dir,
            overrides,
            message=(
                f"{snap.dir} ran with other settings than this sweep's: {'; '.join(found)}. One report "
                "would mix two experiments: sweep into a new dir (no SWEEP_DIR), or pass "
                "run.allow_changes=true to go on with the changes"
            ),
        )
    if snap.status == "finished":
        if sweep:
            return Plan("skip", snap.dir, overrides, message="finished in an earlier launch, skipped")
        return Plan(
            "refuse",
            snap.dir,
            overrides,
            message=f"{snap.dir} already holds a finished run; {another} or pass run.overwrite=true",
        )
    explicit = flags.resume not in ("auto", "never")
    if not snap.started:
        checkpoint = flags.resume if explicit else None
        return Plan("new", snap.dir, overrides, RECORD, checkpoint, "\n".join(notes))
    if flags.resume == "never":
        return Plan(
            "refuse",
            snap.dir,
            overrides,
            message=f"{snap.dir} holds an earlier run and run.resume=never; {another}",
        )
    checkpoint = flags.resume if explicit else (str(snap.complete[-1]) if snap.complete else None)
    newest = step(snap.complete[-1]) if snap.complete else -1
    skipped = [c for c in snap.incomplete if step(c) > newest]
    notes += [f"skipping {c}: incomplete (the run stopped while writing it)" for c in skipped]
    record = f"{RELAUNCHED}/{stamp}" if snap.recorded else RECORD
    latest = snap.latest
    if latest is None:
        return Plan("resume", snap.dir, overrides, record, checkpoint, "\n".join(notes))
    started_with = [o for o in latest.overrides if key(o) not in LAUNCH_ONLY]
    now = {key(o): o for o in overrides}
    merged = [now.pop(key(o), o) for o in started_with] + list(now.values())
    found = []
    if compose is not None:
        composed = compose(merged)
        found = changes(latest.config, composed)
        if world != latest.world:
            found.append(
                f"processes x nodes: {latest.world} -> {world} (global batch {global_batch(latest.config, latest.world)} "
                f"-> {global_batch(composed, world)})"
            )
    fixed = [change for change in found if change.split(":", 1)[0] in FIXED]
    if fixed:
        return Plan(
            "refuse",
            snap.dir,
            merged,
            message=(
                f"{snap.dir} holds an unfinished run whose checkpoints hold the model, adapter and reference "
                f"it started with; these cannot change mid-run: {'; '.join(fixed)}. Start a new run "
                f"({another}), or resume without them"
            ),
        )
    if found and not flags.allow_changes:
        kept = " ".join(o.removeprefix("++") for o in started_with)
        return Plan(
            "refuse",
            snap.dir,
            merged,
            message=(
                f"{snap.dir} holds an unfinished run; resuming it with these overrides would change what it "
                f"trains: {'; '.join(found)}. Resume without them (its own overrides are kept: {kept}), "
                "pass run.allow_changes=true to resume with the changes recorded, or pick another name (RUN=...)"
            ),
        )
    return Plan("resume", snap.dir, merged, record, checkpoint, "\n".join(notes), found)
