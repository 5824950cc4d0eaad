"""The exported model card names no path of this machine and its Reproduce line runs as written."""

import re

import yaml

from dpo_recipes import config
from dpo_recipes.after import export, trained
from dpo_recipes.rundir import paths


def finished_run(run_dir, base: str, given: dict | None) -> trained.Run:
    summary = {
        "recipe": "tiny_lora_dpo",
        "config": {
            "model": {"model_name_or_path": base, "use_peft": True},
            "dataset": {"path": "/srv/cache/dpo-recipes/data/toy/train.jsonl"},
            "train": {"loss_type": ["sigmoid"], "beta": 0.1},
        },
        "overrides": ["recipes=tiny_lora_dpo", "train.beta=0.2", "dataset.path=/home/someone/prefs.jsonl"],
        "reference": {"strategy": "adapter"},
        "status": "finished",
        "steps": 2,
        "dataset": {"train": {"rows_read": 32}, "eval": {"rows_read": 16}},
        "eval_source": "16 rows of /srv/cache/dpo-recipes/data/toy/eval.jsonl",
        "final": {},
        "best": {},
    }
    if given is not None:  # Hydra's record of the launch: the config before interpolations resolve
        (run_dir / paths.RECORD).mkdir(parents=True)
        (run_dir / paths.RECORD / paths.CONFIG).write_text(yaml.safe_dump(given))
    return trained.Run(run_dir, summary, run_dir)


def test_a_local_base_and_data_are_named_as_the_recipe_gives_them(tmp_path):
    given = {
        "model": {"model_name_or_path": "${tiny_model:}"},
        "dataset": {"path": "${dpo_root:data/toy/train.jsonl}"},
    }
    card = export.card(finished_run(tmp_path, "/srv/cache/dpo-recipes/tiny-llama-v3", given), "merged")
    assert not export.ABSOLUTE.search(card), card
    assert "base_model:" not in card  # the Hub's field takes a hub id only
    assert "Base model: `${tiny_model:}`" in card and "- train (data/toy/train.jsonl)" in card
    assert "16 rows of eval.jsonl" in card
    reproduce = card.split("## Reproduce")[1]
    assert "make train RECIPE=tiny_lora_dpo ARGS='train.beta=0.2 dataset.path=prefs.jsonl'" in reproduce


def test_a_hub_base_is_named_by_its_id_and_the_reproduce_line_composes(tmp_path):
    card = export.card(finished_run(tmp_path, "Qwen/Qwen2.5-7B", None), "merged")
    assert "base_model: Qwen/Qwen2.5-7B" in card and not export.ABSOLUTE.search(card)
    command = re.search(r"make train RECIPE=(\S+) ARGS='(.*)'", card)
    assert "recipes=" not in command.group(2)  # the recipe once, as RECIPE
    config.compose([f"recipes={command.group(1)}", *command.group(2).split()])  # runnable as written
