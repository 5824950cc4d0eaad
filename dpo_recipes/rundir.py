"""The run dir: where everything in it lives, what it holds (read once), and what a launch does with it
(decided once, by `plan`, a pure function). Whatever acts on a run dir reads that plan: the relaunch
that continues a run, Hydra's record of the launch, replacing a run, skipping a sweep's finished job,
the checkpoint to resume from, and cleaning up after a launch that failed before training.

Each launch of a run is recorded in its own folder: the first in `.hydra/`, later ones in
`.hydra/relaunched/<time>/`, each with Hydra's files (the overrides it ran with, its composed config)
and `launch.yaml` (processes, nodes, hardware option). A relaunch starts from the newest record, so a
change once allowed stays allowed.
"""

import fnmatch
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CHECKPOINT = "checkpoint-"
METRICS = "dpo_metrics"
RECORD = ".hydra"
RELAUNCHED = f"{RECORD}/relaunched"
LAUNCH = "launch.yaml"  # in each record, beside Hydra's files
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
LAUNCH_ONLY = ("run.resume", "run.overwrite", "run.allow_changes")  # how a launch ran, not the run
LOCK = ".launch.lock"  # the live launch holding the dir: host, pid, launch time
# What a run and the steps after it write at the top of its dir (the only names run.overwrite removes):
# records, metrics, checkpoints, weights, tokenizer files, the model card, loggers' folders, exports
WRITTEN = (
    RECORD, METRICS, f"{CHECKPOINT}*", "changes_*.yaml", LOCK, "export", "wandb", "runs", "*.log",
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "adapter_config.json", "training_args.bin", "README.md", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt", "*.model",
)  # fmt: skip


def key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / METRICS / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob(f"{CHECKPOINT}*") if p.is_dir() and p.name[len(CHECKPOINT) :].isdigit()]
    return sorted(found, key=step)


def step(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT) :])


def complete(checkpoint: Path) -> bool:
    """A checkpoint is complete once the Trainer wrote trainer_state.json, its last file."""
    try:
        return "global_step" in json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False


def records(run_dir: Path) -> list[Path]:
    """The records of the run's launches, oldest first."""
    first = [run_dir / RECORD] if (run_dir / RECORD / "overrides.yaml").exists() else []
    later = sorted(p.parent for p in (run_dir / RELAUNCHED).glob("*/overrides.yaml"))
    return first + later


@dataclass(frozen=True)
class Launch:
    """One recorded launch: its overrides, its composed config, its processes x nodes."""

    overrides: list[str]
    config: dict
    world: int


def read_launch(record: Path) -> Launch:
    launch = yaml.safe_load((record / LAUNCH).read_text()) if (record / LAUNCH).exists() else {}
    config = yaml.safe_load((record / "config.yaml").read_text()) if (record / "config.yaml").exists() else {}
    overrides = yaml.safe_load((record / "overrides.yaml").read_text()) or []
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
        recorded=(run_dir / RECORD / "config.yaml").exists(),
        foreign=tuple(sorted(p.name for p in run_dir.iterdir() if not written(p.name))),
        **dict(zip(("lock", "locker"), locked(run_dir) if first_node else (None, {}), strict=True)),
    )


def written(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in WRITTEN)


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


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


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
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from dpo_recipes import config

    os.environ.setdefault("DPO_RUN_STAMP", now())  # this compose and Hydra's name the same dir
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
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
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

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


WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def missing_weights(run_dir: Path) -> list[str]:
    """What a finished run must hold and does not: its weights (adapter or model) and its tokenizer."""
    missing = [] if any((run_dir / name).exists() for name in WEIGHTS) else ["weights"]
    return missing + ([] if (run_dir / "tokenizer_config.json").exists() else ["tokenizer"])
