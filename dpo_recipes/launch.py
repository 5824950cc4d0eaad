"""Launch training on several processes through accelerate, with the accelerate config that the composed
`hardware` option names: the option file is the one source, so the launch and the run always agree.

python -m dpo_recipes.launch --nproc 8 [--nnodes 2 --node-rank 0 --main-addr 10.0.0.1 --main-port 29500] \
    recipes=qwen7b_full_dpo hardware=zero3 [overrides...]

Every process writes into the run dir printed first: the launch time is fixed once (DPO_RUN_STAMP),
and a launch over several nodes needs a run name, since each node's clock names its own dir. The
launcher runs in a session of its own: a Ctrl-C or SIGTERM reaches this process, which passes it once
to each training process (never to torch's launcher, which would kill them SHUTDOWN_TIMEOUT seconds
later); they stop together at the end of a step, save a checkpoint and exit, and this process exits
with 128 + the signal's number, printing the command that resumes the run. The same signal again
(after FORWARDED_WITHIN seconds) stops them at once.
"""

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig

from dpo_recipes import ROOT, config, errors
from dpo_recipes.config import schema
from dpo_recipes.rundir import launching, paths, planning

# torch's launcher SIGKILLs its workers this many seconds after passing them a signal it received
# itself (scancel signals every process of a job): 30 by default, too little for a 7B checkpoint.
SHUTDOWN_TIMEOUT = "900"


def command(
    overrides: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, addr="127.0.0.1", port=29500
):
    """The `accelerate launch` command line for the composed run; ConfigError for a one-process option."""
    cfg, _ = config.compose(overrides)
    accelerate_config = cfg.hardware.accelerate_config
    if not accelerate_config:
        option = HydraConfig.get().runtime.choices.get("hardware")
        raise errors.ConfigError(
            [
                f"hardware={option} runs in one process; to launch {nproc} use one of: {', '.join(schema.scalable())}"
            ]
        )
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    deepspeed = (yaml.safe_load(Path(accelerate_config).read_text()).get("deepspeed_config") or {}).get(
        "deepspeed_config_file"
    )
    if deepspeed:  # named from the project's root there, as `accelerate launch` run in it reads it
        launcher += ["--deepspeed_config_file", str(ROOT / deepspeed)]
    launcher += ["--num_processes", str(nproc * nnodes), "--num_machines", str(nnodes)]
    launcher += [
        "--machine_rank",
        str(node_rank),
        "--main_process_ip",
        addr,
        "--main_process_port",
        str(port),
    ]
    return [*launcher, "-m", "dpo_recipes.train", *config.plain_keys(overrides)]


def run_dir(overrides: list[str], nnodes: int, nproc: int = 1, node_rank: int = 0) -> Path:
    """The dir every process of the launch writes into; ConfigError where nodes could disagree or the
    dir's plan refuses the launch (the first node's launch holds the dir: the others join it)."""
    named = any(planning.key(o) in ("run.name", "hydra.run.dir") for o in overrides)
    if nnodes > 1 and not named:
        raise errors.ConfigError(
            [
                f"a launch over {nnodes} nodes needs a run name (RUN=<name>): each node's clock would name its own dir"
            ]
        )
    os.environ.setdefault("DPO_RUN_STAMP", launching.now())
    # refused before any process starts
    plan = launching.decide(config.plain_keys(overrides), nproc * nnodes, first_node=node_rank == 0)
    if plan.action == "refuse":
        raise errors.ConfigError([plan.message])
    return plan.dir


def outcome(run: Path, code: int, received: list[int]) -> int:
    """The launch's exit code: the training processes' failure, else what the run's summary says."""
    summary = paths.summary(run)
    status = summary.get("status", "")
    if code or status == "finished":
        return code
    if status == "interrupted":
        return 128 + signal.Signals[summary.get("signal") or signal.Signals(received[0]).name]
    return 1 if status else (128 + received[0] if received else code)


def launch(cmd: list[str], run: Path, make_vars: str) -> int:
    """Run torch's launcher in its own session; pass each signal this process receives to the
    training processes (its children) only."""
    env = {**os.environ, errors.LAUNCHED: make_vars}
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT)
    process = subprocess.Popen(cmd, env=env, start_new_session=True)
    received = []

    def forward(signum, frame):
        import psutil

        received.append(signum)
        for worker in psutil.Process(process.pid).children():
            worker.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return outcome(run, code, received)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_recipes.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, required=True, help="processes per node")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--main-addr", default="127.0.0.1")
    parser.add_argument("--main-port", type=int, default=29500)
    args, overrides = parser.parse_known_args(argv)
    try:
        run = run_dir(overrides, args.nnodes, args.nproc, args.node_rank)
        cmd = command(overrides, args.nproc, args.nnodes, args.node_rank, args.main_addr, args.main_port)
    except errors.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    hardware = HydraConfig.get().runtime.choices.get("hardware")
    make_vars = f"HARDWARE={hardware} NPROC={args.nproc}" + (
        f" NNODES={args.nnodes}" if args.nnodes > 1 else ""
    )
    print(f"run dir (every process, every node): {run}\n{' '.join(cmd)}", flush=True)
    return launch(cmd, run, make_vars)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
