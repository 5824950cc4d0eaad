"""Check a recipe without loading weights: compose, build every TRL object as the machine it plans for
would (a GPU recipe here too), print the resolved config, then the predicted peak memory and whether it
fits (memory/; plan for another card with memory_gb).

python -m dpo_recipes.validate recipes=qwen7b_lora_dpo [hardware.memory_gb=80] [overrides...]
"""

import sys
import tempfile

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from dpo_recipes import config, errors
from dpo_recipes.config import precision, schema, views
from dpo_recipes.memory import preflight
from dpo_recipes.training import segments


def main(argv: list[str]) -> int:
    try:
        cfg, recipe = config.compose(argv)
        with tempfile.TemporaryDirectory() as scratch:
            built = config.build(cfg, scratch, machine=False)
    except (errors.ConfigError, HydraException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if why := segments.refused(built):
            raise errors.ConfigError([why])
        fit = preflight.preflight(built).lines
    except (errors.TooBig, errors.Unreachable, errors.ConfigError) as err:
        fit, refused = [], err
    else:
        refused = None
    print(OmegaConf.to_yaml(cfg, resolve=True))
    peft = type(built.peft).__name__ if built.peft else "no PEFT"
    quantization = type(built.quantization).__name__ if built.quantization else "no quantization"
    args = schema.trl_name(type(built.args))
    print(f"recipe {recipe}: {args}, ModelConfig, {peft}, {quantization} built; no weights loaded")
    if (
        views.on_gpu(cfg.hardware.device, cfg.train)
        and not cfg.train.get("use_cpu")
        and not torch.cuda.is_available()
    ):
        print(
            f"note: no CUDA GPU here: {args} was built as the GPU run would build it; to train here add hardware=cpu"
        )
    if note := precision.note(built):
        print(note)
    if fit:
        print("\n".join(fit))
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
