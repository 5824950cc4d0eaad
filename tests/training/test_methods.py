"""Preference methods without a reference model, from trl.experimental, chosen like any option: ORPO
(task: orpo) and SimPO (task: cpo, loss_type simpo) through the same groups, run dir and metrics files."""

import json

import pytest
from conftest import run
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from dpo_recipes import config, errors
from dpo_recipes.training import chat, data

TRAINERS = {"tiny_orpo": ORPOTrainer, "tiny_simpo": CPOTrainer}
SHORT = ["dataset.max_samples=32", "dataset.max_eval_samples=8", "++train.logging_steps=1"]


@pytest.mark.parametrize(
    "recipe,overrides,words",
    [
        ("tiny_orpo", ["reference=copy"], "reference=copy: task=orpo trains with ORPO"),
        ("tiny_simpo", ["reference=precomputed"], "with no reference model"),
        ("tiny_simpo", ["loss=ipo"], "loss=ipo: task=cpo trains with CPO or SimPO"),
        ("tiny_orpo", ["train.share_prompt=true"], "train.share_prompt: not a ORPOConfig field"),
        ("tiny_simpo", ["train.simpo_gama=1"], "did you mean 'simpo_gamma'"),
    ],
)
def test_each_method_reads_train_as_its_own_config_and_refuses_what_belongs_to_dpo(recipe, overrides, words):
    built = config.build(config.compose([f"recipes={recipe}"])[0], "unused", machine=False)
    assert type(built.args).__name__ == {"tiny_orpo": "ORPOConfig", "tiny_simpo": "CPOConfig"}[recipe]
    with pytest.raises(errors.ConfigError) as err:
        config.check(config.compose([f"recipes={recipe}", *overrides])[0])
    assert words in str(err.value), err.value


@pytest.mark.slow
@pytest.mark.parametrize("recipe", TRAINERS)
def test_each_method_logs_trls_own_losses_on_the_same_rows(recipe, tmp_path):
    """The recipe's run and TRL's trainer given the same rows, config and LoRA: the same loss at each
    of 3 steps, within 1e-5."""
    overrides = [f"recipes={recipe}", *SHORT, "++train.max_steps=3", "++train.eval_strategy=no"]
    trainer, metrics = run(tmp_path, overrides)
    assert type(trainer) is TRAINERS[recipe]
    ours = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    built = config.build(config.compose(overrides)[0], tmp_path / "trl")
    train_set, _, _ = data.load(built.dataset, built.args.seed, built.args.dataset_num_proc)
    tokenizer = chat.tokenizer(built)
    chat.check_template(tokenizer, train_set, built)
    theirs = TRAINERS[recipe](
        model=built.model.model_name_or_path,
        args=built.args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=built.peft,
    )
    theirs.train()
    trl = [e["loss"] for e in theirs.state.log_history if "loss" in e]
    assert len(ours) == len(trl) == 3
    assert ours == pytest.approx(trl, abs=1e-5)
    summary = json.loads((metrics / "summary.json").read_text())
    assert summary["task"] == built.task and summary["status"] == "finished"
    assert "rewards/margins" in (metrics / "training_metrics.csv").read_text().splitlines()[0]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", TRAINERS)
def test_each_tiny_method_recipe_learns_the_toy(recipe, tmp_path):
    """As shipped: the share of held-out pairs whose chosen answer the policy prefers, at the end."""
    trainer, metrics = run(tmp_path, [f"recipes={recipe}", "++train.disable_tqdm=true"])
    summary = json.loads((metrics / "summary.json").read_text())
    assert summary["final"]["eval_rewards/accuracies"] >= 0.9, summary["final"]
