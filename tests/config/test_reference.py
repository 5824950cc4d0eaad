"""Reference strategies: which object plays the reference, and bad combinations fail before loading."""

import math

import pytest
import torch
from conftest import tiny_overrides

from dpo_recipes import ROOT, config, train
from dpo_recipes.config import reference
from dpo_recipes.errors import ConfigError
from dpo_recipes.sources import tiny


def run(tmp_path, recipe, *overrides):
    """Sigmoid DPO, whose first loss is exactly ln 2 when policy and reference agree."""
    cfg, name = config.compose(tiny_overrides(recipe, "loss=sigmoid", *overrides))
    return train.run(cfg, tmp_path / "run", name)


def first_loss(trainer) -> float:
    return next(e["loss"] for e in trainer.state.log_history if "loss" in e)


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["recipes=tiny_full_dpo", "reference=adapter"], "reference=adapter needs a LoRA model option"),
        (["reference=path"], "reference=path needs the reference model's path"),
        (["reference=sft_adapter"], "reference=sft_adapter needs the SFT LoRA adapter"),
        (["+train.sync_ref_model=true"], "TR-DPO needs a separate reference model"),
        (["recipes=tiny_full_dpo", "reference=precomputed", "+train.sync_ref_model=true"], "cannot follow"),
        (["+train.precompute_ref_log_probs=true"], "set it through reference=precomputed"),
        (["reference.strategy=mirror"], "unknown 'mirror'"),
    ],
)
def test_incompatible_combinations_fail_at_validation(overrides, message):
    cfg, _ = config.compose(overrides)
    with pytest.raises(ConfigError, match=message):
        config.check(cfg)


def test_auto_picks_adapter_for_lora_and_copy_for_full_fine_tuning(tmp_path):
    for recipe, strategy in (("tiny_lora_dpo", "adapter"), ("tiny_full_dpo", "copy")):
        built = config.build(config.compose([f"recipes={recipe}"])[0], tmp_path)
        assert built.reference.strategy == strategy


def test_every_strategy_has_its_option_file_and_a_line_in_the_docs():
    table = reference.__doc__
    for name in reference.STRATEGIES:
        assert (ROOT / "conf" / "reference" / f"{name}.yaml").is_file()
        assert f"| {name} " in table


@pytest.mark.slow
def test_adapter_keeps_no_second_model(tmp_path):
    trainer = run(tmp_path, "tiny_lora_dpo", "reference=adapter")
    assert trainer.ref_model is None and hasattr(trainer.model, "disable_adapter")
    assert first_loss(trainer) == pytest.approx(math.log(2), abs=1e-3)


@pytest.mark.slow
def test_copy_is_a_frozen_copy_of_the_starting_weights(tmp_path):
    trainer = run(tmp_path, "tiny_full_dpo", "reference=copy")
    reference = trainer.ref_model
    assert reference is not None and reference is not trainer.model
    assert all(p.grad is None for p in reference.parameters())  # TRL runs it under no_grad
    start = weights(type(reference).from_pretrained(tiny.path()))
    assert all(torch.equal(start[k], v) for k, v in reference.state_dict().items())


@pytest.mark.slow
def test_path_uses_the_other_weights(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A reference that differs by construction: the tiny base with its output layer zeroed predicts the
    # uniform distribution, log p_ref(y) = -len(y) * ln(vocab), far below the pre-trained policy's.
    other = tmp_path / "other"
    uniform = AutoModelForCausalLM.from_pretrained(tiny.path())
    torch.nn.init.zeros_(uniform.lm_head.weight)
    uniform.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny.path()).save_pretrained(other)
    trainer = run(tmp_path, "tiny_full_dpo", "reference=path", f"reference.path={other}")
    expected = weights(type(trainer.ref_model).from_pretrained(other))
    got = trainer.ref_model.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in got.items())
    assert not torch.equal(got["lm_head.weight"], trainer.model.state_dict()["lm_head.weight"])
    first = next(e for e in trainer.state.log_history if "loss" in e)
    # Each answer token is worth ln(vocab) ~ 6.9 nats under the reference and well under 1 under the
    # policy, so beta * (log p - log p_ref) is positive by several nats per token for every answer.
    per_token = trainer.args.beta * (math.log(len(trainer.processing_class)) - 1.0)
    assert first["rewards/chosen"] > per_token and first["rewards/rejected"] > per_token


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tiny_lora_dpo", "tiny_full_dpo"])
def test_precomputed_holds_no_reference_and_reuses_the_cache(recipe, tmp_path):
    first = run(tmp_path / "a", recipe, "reference=precomputed")
    assert first.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(first.train_dataset.column_names)
    assert first_loss(first) == pytest.approx(math.log(2), abs=1e-3)
    second = run(tmp_path / "b", recipe, "reference=precomputed", "train.beta=0.2")
    assert second.ref_logps_cache == {"train": "hit", "eval": "hit"}


@pytest.mark.slow
def test_sft_adapter_is_the_frozen_reference(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny.path()),
        LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False),  # a non-zero update
    )
    sft.save_pretrained(tmp_path / "sft")
    trainer = run(tmp_path, "tiny_lora_dpo", "reference=sft_adapter", f"reference.path={tmp_path / 'sft'}")
    assert trainer.ref_model is None and "ref" in trainer.model.peft_config
    # Policy and reference both start at the SFT adapter; against the bare base the loss would not be ln 2.
    assert first_loss(trainer) == pytest.approx(math.log(2), abs=1e-3)
