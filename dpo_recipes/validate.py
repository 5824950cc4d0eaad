"""Check a recipe without loading weights: compose, build every TRL object, print the resolved config,
then the predicted peak memory and whether it fits (memory.py; plan for another card with memory_gb).

python -m dpo_recipes.validate recipes=qwen7b_lora_dpo [hardware.memory_gb=80] [overrides...]
"""

import sys
import tempfile

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from dpo_recipes import config, hub, memory, rules, schema

# TRL's DPOConfig (RewardConfig) refuses bf16 where no GPU is visible: a GPU recipe is built here as on a CPU, said so.
CPU_STAND_IN = ["train.bf16=false", "train.fp16=false"]


def overrides_here(cfg) -> list[str]:
    """CPU_STAND_IN when `cfg` trains on a GPU and this machine has none."""
    gpu = rules.on_gpu(cfg.hardware.device, cfg.train)
    return CPU_STAND_IN if gpu and not torch.cuda.is_available() else []


def main(argv: list[str]) -> int:
    try:
        cfg, recipe = config.compose(argv)
        here, asked = overrides_here(cfg), cfg
        if here:
            cfg, recipe = config.compose([*argv, *here])
        with tempfile.TemporaryDirectory() as scratch:
            built = config.build(cfg, scratch, machine=False)
    except (config.ConfigError, HydraException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        half = asked.train.get("bf16") or asked.train.get("fp16")  # as the GPU runs it, not the stand-in
        mixed = {"mixed": torch.bfloat16 if asked.train.get("bf16") else torch.float16} if half else {}
        _, fit = memory.preflight(built, **mixed)
    except (memory.TooBig, hub.Unreachable) as err:
        fit, refused = [], err
    else:
        refused = None
    print(OmegaConf.to_yaml(cfg, resolve=True))
    peft = type(built.peft).__name__ if built.peft else "no PEFT"
    quantization = type(built.quantization).__name__ if built.quantization else "no quantization"
    args = schema.trl_name(type(built.args))
    print(f"recipe {recipe}: {args}, ModelConfig, {peft}, {quantization} built; no weights loaded")
    if here:
        print(
            f"note: no CUDA GPU here, so {args} was built with {' '.join(here)}; to train here add hardware=cpu"
        )
    if fit:
        print("\n".join(fit))
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
