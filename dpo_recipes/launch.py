"""Launch training on several processes through accelerate, with the accelerate config that the composed
`hardware` option names: the option file is the one source, so the launch and the run always agree.

python -m dpo_recipes.launch --nproc 8 [--nnodes 2 --node-rank 0 --main-addr 10.0.0.1 --main-port 29500] \
    recipes=qwen7b_full_dpo hardware=zero3 [overrides...]
"""

import argparse
import subprocess
import sys

import yaml
from hydra.core.hydra_config import HydraConfig

from dpo_recipes import config


def scalable() -> list[str]:
    """The hardware options that name an accelerate config, so that they run on several processes."""
    options = sorted((config.CONF_DIR / "hardware").glob("*.yaml"))
    return [
        p.stem for p in options if (yaml.safe_load(p.read_text()) or {})["hardware"].get("accelerate_config")
    ]


def command(
    overrides: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, addr="127.0.0.1", port=29500
):
    """The `accelerate launch` command line for the composed run; ConfigError for a one-process option."""
    cfg, _ = config.compose(overrides)
    accelerate_config = cfg.hardware.accelerate_config
    if not accelerate_config:
        option = HydraConfig.get().runtime.choices.get("hardware")
        raise config.ConfigError(
            [f"hardware={option} runs in one process; to launch {nproc} use one of: {', '.join(scalable())}"]
        )
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_recipes.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, required=True, help="processes per node")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--main-addr", default="127.0.0.1")
    parser.add_argument("--main-port", type=int, default=29500)
    args, overrides = parser.parse_known_args(argv)
    try:
        cmd = command(overrides, args.nproc, args.nnodes, args.node_rank, args.main_addr, args.main_port)
    except config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
