"""dpo-recipes: the Makefile's verbs as one command that runs from any directory.

Your own options are read before the shipped ones of the same name: `./conf/<group>/<option>.yaml` and
`./recipes/<recipe>.yaml` in the current directory, or in each --config-dir. Runs go under ./outputs
and sweeps under ./multirun, as with make.
"""

import hashlib
import os
import runpy
import sys
from pathlib import Path

from data_prep.io import write_text
from dpo_recipes.sources.assets import cache_dir

# verb: (the module it runs as `python -m`, what it does); each takes that module's arguments
VERBS = {
    "train": ("dpo_recipes.train", "train a recipe (a name or a .yaml file) with key=value overrides"),
    "sweep": ("dpo_recipes.train", "several runs (Hydra multirun): key=a,b grids, hydra/launcher=..."),
    "validate": ("dpo_recipes.validate", "compose a recipe and build TRL's objects; no weights load"),
    "prep": ("data_prep", "convert FORMAT IN OUT to TRL's prompt/chosen/rejected form"),
    "iterate": (
        "dpo_recipes.after.rounds",
        "on-policy rounds: sample, judge, pair best vs worst, train DPO again",
    ),
    "samples": (
        "dpo_recipes.after.samples",
        "the reference's and the policy's answers of a run side by side",
    ),
    "eval": (
        "dpo_recipes.after.evaluate",
        "judge a run's answers against its reference's: win rates with intervals",
    ),
    "export": ("dpo_recipes.after.export", "a run as a standalone model (LoRA merged) with a model card"),
    "sweep-report": ("dpo_recipes.after.sweep", "rebuild the report of a sweep's dir"),
}
RECIPE_VERBS = {"train", "sweep", "validate", "iterate"}  # their first argument may name the recipe
LAUNCH = "dpo_recipes.launch"  # train with --nproc: one process per device through accelerate

STARTER = {
    "conf/dataset/my_data.yaml": """\
# A dataset option of your own (`dataset=my_data`): point `path` at your preference data, a .jsonl, .json
# or .parquet file, a folder saved by `datasets`, or a hub id. `format` is its layout: trl (prompt/
# chosen/rejected), alpaca, ultrafeedback or sharegpt; `dpo-recipes prep` reports what it would drop.
# It starts on the bundled toy preferences.
path: ${dpo_root:data/toy/train.jsonl}
eval_path: ${dpo_root:data/toy/eval.jsonl}
format: trl
""",
    "recipes/my_recipe.yaml": """\
# @package _global_
# A recipe of your own: `dpo-recipes train my_recipe`. It is the shipped tiny_lora_dpo on your dataset
# option; pick other options below (e.g. model qwen2_5_7b_lora with hardware gpu for Qwen2.5-7B with
# LoRA on one GPU) and check with `dpo-recipes validate my_recipe`, which loads no weights.
defaults:
  - override /model: tiny_llama_lora
  - override /dataset: my_data
  - override /loss: rpo_strong
  - override /hardware: cpu

train:
  learning_rate: 5.0e-3
  max_steps: 150
  max_length: 256
  logging_steps: 5
  eval_steps: 10
  save_strategy: steps
  save_steps: 50
  save_total_limit: 2
""",
}


def usage() -> str:
    verbs = "\n".join(f"  {verb:<13} {what}" for verb, (_, what) in VERBS.items())
    return (
        "usage: dpo-recipes VERB [--config-dir DIR ...] [arguments]\n\n"
        f"{__doc__.splitlines()[0]}\n\n{verbs}\n"
        f"  {'init':<13} write a starter recipe and dataset option into the current directory\n\n"
        "dpo-recipes VERB --help: that verb's own arguments"
    )


def staged(recipe_file: Path) -> tuple[Path, str]:
    """A folder whose recipes/ holds `recipe_file` (linked, so edits to it count), and the recipe's name.
    It stays in the cache: a sweep's queued jobs compose from it after this process ends."""
    source = recipe_file.resolve()
    folder = cache_dir() / "recipe_files" / hashlib.sha256(str(source).encode()).hexdigest()[:16]
    link = folder / "recipes" / f"{source.stem}.yaml"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        temporary = link.with_name(f".{link.name}.{os.getpid()}")
        temporary.symlink_to(source)
        os.replace(temporary, link)  # two first uses at once: either link is the same
    return folder, source.stem


def options(argv: list[str], verb: str) -> tuple[list[str], list[str]]:
    """The folders to read options from and the arguments left for the verb; a first argument that names
    a recipe (a file, or a name without `=`) becomes `recipes=<name>`."""
    folders, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--config-dir":
            folders.append(next(args, ""))
        elif arg.startswith("--config-dir="):
            folders.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    if missing := [f for f in folders if not Path(f).is_dir()]:
        raise ValueError(f"--config-dir {missing[0]!r}: no such folder")
    folders = [str(Path(f).resolve()) for f in folders] or [os.getcwd()]
    first = rest[0] if rest else ""
    if verb in RECIPE_VERBS and first and "=" not in first and not first.startswith("-"):
        if first.endswith((".yaml", ".yml")):
            if not Path(first).is_file():
                raise ValueError(f"recipe file {first!r} not found")
            folder, first = staged(Path(first))
            folders.insert(0, str(folder))
        rest[0] = f"recipes={first}"
    return folders, rest


def init(argv: list[str]) -> int:
    here = Path(argv[0] if argv else ".")
    if taken := [str(here / p) for p in STARTER if (here / p).exists()]:
        print(f"error: {', '.join(taken)} already exist; nothing written", file=sys.stderr)
        return 2
    for relative, text in STARTER.items():
        write_text(here / relative, text)
        print(f"wrote {here / relative}")
    print("next: dpo-recipes validate my_recipe, then dpo-recipes train my_recipe")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb, args = (argv[0], argv[1:]) if argv else ("", [])
    if verb == "init":
        return init(args)
    if verb not in VERBS:
        print(usage(), file=sys.stderr if verb not in ("-h", "--help") else sys.stdout)
        return 0 if verb in ("-h", "--help") else 2
    try:
        folders, args = options(args, verb)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    earlier = os.environ.get("DPO_RECIPES_CONFIG")
    os.environ["DPO_RECIPES_CONFIG"] = os.pathsep.join([*folders, *([earlier] if earlier else [])])
    module = VERBS[verb][0]
    if verb == "train" and any(a.startswith("--nproc") for a in args):
        module = LAUNCH
    args = ["-m", *args] if verb == "sweep" else args
    sys.argv = [f"dpo-recipes {verb}", *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            return 1
        return code or 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
