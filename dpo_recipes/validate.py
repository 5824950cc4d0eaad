"""Check a recipe without loading weights: compose, build every TRL object as the machine it plans for
would (a GPU recipe here too), then say what was built, the predicted peak memory and whether it fits
(memory/; plan for another card with memory_gb), and what a launch on this machine would refuse (a GPU,
processes, a wandb login). `--show-config` prints the resolved config after it.

python -m dpo_recipes.validate recipes=qwen7b_lora_dpo [hardware.memory_gb=80] [--show-config] [overrides...]
"""

import sys
import tempfile

from hydra.errors import HydraException
from omegaconf import OmegaConf

from dpo_recipes import config, errors
from dpo_recipes.config import precision, schema, views
from dpo_recipes.config.machine import MACHINE
from dpo_recipes.memory import preflight
from dpo_recipes.training import segments

SHOW = "--show-config"


def main(argv: list[str]) -> int:
    show, argv = SHOW in argv, [a for a in argv if a != SHOW]
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
    peft = type(built.peft).__name__ if built.peft else "no PEFT"
    quantization = type(built.quantization).__name__ if built.quantization else "no quantization"
    lines = [
        f"recipe {recipe}: {schema.trl_name(type(built.args))}, ModelConfig, {peft}, {quantization} built; "
        "no weights loaded"
    ]
    if note := precision.note(built):
        lines.append(note)
    lines += fit
    view = views.read(cfg)
    here = [problem for rule in MACHINE.values() for problem in rule(view)]
    lines += ["a launch on this machine would refuse it:", *(f"  {p}" for p in here)] if here else []
    lines.append("the resolved config: below" if show else f"the resolved config: add {SHOW} to print it")
    print("\n".join(lines))
    if refused:
        print(f"error: {refused}", file=sys.stderr)
    if show:
        print(OmegaConf.to_yaml(cfg, resolve=True))
    return 2 if refused else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
