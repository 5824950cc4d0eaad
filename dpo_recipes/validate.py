"""Check a recipe without loading weights: compose, build every TRL object, print the resolved config.

python -m dpo_recipes.validate recipes=qwen7b_lora_dpo [overrides...]
"""

import sys
import tempfile

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from dpo_recipes import config, rules, schema

# TRL's DPOConfig (RewardConfig) refuses bf16 where no GPU is visible: a GPU recipe is built here as on a CPU, said so.
CPU_STAND_IN = ["train.bf16=false", "train.fp16=false"]


def overrides_here(cfg) -> list[str]:
    """CPU_STAND_IN when `cfg` trains on a GPU and this machine has none."""
    gpu = rules.on_gpu(cfg.hardware.device, cfg.train)
    return CPU_STAND_IN if gpu and not torch.cuda.is_available() else []


def main(argv: list[str]) -> int:
    try:
        cfg, recipe = config.compose(argv)
        here = overrides_here(cfg)
        if here:
            cfg, recipe = config.compose([*argv, *here])
        with tempfile.TemporaryDirectory() as scratch:
            built = config.build(cfg, scratch, machine=False)
    except (config.ConfigError, HydraException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(OmegaConf.to_yaml(cfg, resolve=True))
    peft = type(built.peft).__name__ if built.peft else "no PEFT"
    quantization = type(built.quantization).__name__ if built.quantization else "no quantization"
    args = schema.trl_name(type(built.args))
    print(f"recipe {recipe}: {args}, ModelConfig, {peft}, {quantization} built; no weights loaded")
    if here:
        print(
            f"note: no CUDA GPU here, so {args} was built with {' '.join(here)}; to train here add hardware=cpu"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
