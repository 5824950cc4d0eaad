"""Check a recipe without loading weights: compose, build every TRL object, print the resolved config.

python -m dpo_recipes.validate recipes=qwen7b_lora_dpo [overrides...]
"""

import sys
import tempfile

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from dpo_recipes import config


def main(argv: list[str]) -> int:
    try:
        cfg, recipe = config.compose(argv)
        with tempfile.TemporaryDirectory() as scratch:
            built = config.build(cfg, scratch, for_training=False)
    except (config.ConfigError, HydraException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(OmegaConf.to_yaml(cfg, resolve=True))
    print(f"recipe {recipe}: DPOConfig, ModelConfig", end="")
    print(f", {type(built.peft).__name__}" if built.peft else ", no PEFT", end="")
    print(f", {type(built.quantization).__name__}" if built.quantization else ", no quantization", end="")
    print(" built; no weights loaded")
    if cfg.hardware.device == "cuda" and not torch.cuda.is_available():
        print("note: no CUDA GPU here, so device checks were skipped; to train here add hardware=cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
