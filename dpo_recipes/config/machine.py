"""The rules that read this machine and launch (`MACHINE`), beside the config's own (rules.py): DeepSpeed
installed, GPUs visible, processes launched, a wandb login. `validate` skips them: it plans for a machine
it need not be on."""

import importlib.util
import os
from pathlib import Path

import torch

from dpo_recipes.config.views import View, on_gpu


# Rules of this machine and launch: extras, GPUs, processes, a wandb login.
def deepspeed(v: View) -> list[str]:
    if v.hardware.engine != "deepspeed" or importlib.util.find_spec("deepspeed") is not None:
        return []
    return [f'hardware={v.choices.get("hardware")} needs DeepSpeed: pip install -e ".[deepspeed]"']


def gpu(v: View) -> list[str]:
    if not on_gpu(v.hardware.device, v.train) or v.train.get("use_cpu") or torch.cuda.is_available():
        return []
    return [
        "hardware: this recipe trains on a CUDA GPU (bf16) and none is visible here; "
        "to run it on this machine add the override hardware=cpu"
    ]


def processes(v: View) -> list[str]:
    engine, world, problems = v.hardware.engine, int(os.environ.get("WORLD_SIZE", "1")), []
    option = v.choices.get("hardware", engine)
    if engine != "single" and world == 1:
        problems.append(
            f"hardware={option} runs through accelerate: make train HARDWARE={option} NPROC=<processes>"
        )
    gpus = torch.cuda.device_count()
    if engine == "single" and world == 1 and gpus > 1 and not v.train.get("use_cpu"):
        problems.append(
            f"{gpus} GPUs are visible to one process: launch with HARDWARE=ddp NPROC=<gpus>, "
            "or make one visible with CUDA_VISIBLE_DEVICES=0"
        )
    if world > 1 and not v.run.name and not os.environ.get("DPO_RUN_STAMP"):
        problems.append(
            "several processes need one run dir: set RUN=<name> (or DPO_RUN_STAMP, as make train does)"
        )
    return problems


def wandb_login(v: View) -> list[str]:
    if v.logger.name != "wandb" or v.logger.mode != "online" or os.environ.get("WANDB_API_KEY"):
        return []
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text():
        return []
    return ["logger=wandb: not logged in; run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline"]


MACHINE = {"deepspeed": deepspeed, "gpu": gpu, "processes": processes, "wandb_login": wandb_login}
