"""The Llama 3.1, Mistral, Gemma 2 and Qwen3 recipes on tiny models of their own architectures
(dpo_recipes/sources/families.py): each family's features are on, its template passes the checks, the
faster paths give the padded batch's values on it (CPU head within 1e-6, packed layouts within 1e-5) or
are refused for it, and each recipe trains as it ships through its smoke line."""

import json
import math
from contextlib import nullcontext

import pytest
import torch
from conftest import run
from datasets import Dataset
from test_head import OUTPUTS
from test_head import scored as head_scored
from test_packing import LAYOUTS, edge_batch, scored
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.utils import add_fused_lm_head

from dpo_recipes import config, errors, validate
from dpo_recipes.config import schema
from dpo_recipes.memory import estimates, shapes
from dpo_recipes.sources import families
from dpo_recipes.training import chat, cpu_head, segments

RECIPES = {
    "llama3": "llama31_8b_lora_dpo",
    "mistral": "mistral7b_lora_dpo",
    "gemma2": "gemma2_9b_lora_dpo",
    "qwen3": "qwen3_8b_lora_dpo",
}
WINDOWED = {"mistral", "gemma2"}
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
SYSTEM = [{"role": "system", "content": "Answer in one line."}]
TURNS = [{"role": "user", "content": "Name a colour."}]


def net(family: str):
    """The family's tiny model in fp32 with TRL's fused head, as DPO runs it."""
    model = AutoModelForCausalLM.from_pretrained(families.path(family), dtype=torch.float32)
    add_fused_lm_head(model, outputs=OUTPUTS)
    return model


def built(family: str, *extra: str):
    cfg, _ = config.compose([f"recipes={RECIPES[family]}", f"+smoke=tiny_{family}", *extra])
    return config.build(cfg, "unused", machine=False)


def rows(prompt: list) -> Dataset:
    answer = [{"role": "assistant", "content": "Blue."}]
    return Dataset.from_list([{"prompt": prompt, "chosen": answer, "rejected": answer}])


@pytest.mark.slow
def test_each_tiny_family_has_the_features_that_set_it_apart():
    models = {f: AutoModelForCausalLM.from_pretrained(families.path(f)) for f in families.FAMILIES}
    assert {f: type(m).__name__ for f, m in models.items()} == {
        "llama3": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }
    assert models["llama3"].config.rope_parameters["rope_type"] == "llama3"
    assert models["mistral"].config.sliding_window == families.WINDOW
    gemma = models["gemma2"]
    assert gemma.config.layer_types == ["sliding_attention", "full_attention"]
    assert gemma.config.attn_logit_softcapping and gemma.config.final_logit_softcapping
    assert gemma.lm_head.weight is gemma.model.embed_tokens.weight
    qwen = models["qwen3"]
    assert hasattr(qwen.model.layers[0].self_attn, "q_norm") and qwen.config.vocab_size == 151936
    think = AutoTokenizer.from_pretrained(families.path("qwen3")).convert_tokens_to_ids(
        ["<think>", "</think>"]
    )
    assert think == [151667, 151668]
    assert all(segments.sliding_layers(m.config) > 0 for f, m in models.items() if f in WINDOWED)
    assert not any(segments.sliding_layers(m.config) for f, m in models.items() if f not in WINDOWED)


# The EOS each family's template makes the run learn, and whether the template writes the tokenizer's BOS
ENDS = {"llama3": "<|eot_id|>", "mistral": "</s>", "gemma2": "<end_of_turn>", "qwen3": "<|im_end|>"}


@pytest.mark.parametrize("family", families.FAMILIES)
def test_each_familys_template_passes_the_checks_and_ends_turns_with_the_eos(family):
    tokenizer = chat.tokenizer(built(family))
    notes = chat.check_template(tokenizer, rows(SYSTEM + TURNS), built(family))
    assert tokenizer.eos_token == ENDS[family], notes
    assert not any("BOS" in note for note in notes)  # the template writes the BOS the tokenizer adds
    text = tokenizer.apply_chat_template(
        [*SYSTEM, *TURNS, {"role": "assistant", "content": "Blue."}], tokenize=False
    )
    assert "Answer in one line." in text and text.rstrip().endswith(ENDS[family]), text


def test_gemmas_own_template_refuses_system_rows_by_name_and_the_recipes_folds_them():
    tokenizer = chat.tokenizer(built("gemma2"))
    data = Dataset.from_list([rows(TURNS)[0], rows(SYSTEM + TURNS)[0], rows(SYSTEM + TURNS)[0]])
    own = built("gemma2", "model.chat_template=gemma")
    with pytest.raises(
        errors.ConfigError, match=r"refuses a system message .*2 of 3 training rows .*row 1\b"
    ):
        chat.check_template(chat.tokenizer(own), data, own)
    chat.check_template(tokenizer, data, built("gemma2"))  # the recipe's gemma_system
    folded = tokenizer.apply_chat_template(SYSTEM + TURNS, tokenize=False, add_generation_prompt=True)
    assert (
        folded
        == "<bos><start_of_turn>user\nAnswer in one line.\n\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    )
    gemma = chat.tokenizer(own)
    for conversation in (
        TURNS,
        [*TURNS, {"role": "assistant", "content": " Blue. "}],
    ):  # no system: Gemma's own
        assert tokenizer.apply_chat_template(conversation, tokenize=False) == gemma.apply_chat_template(
            conversation, tokenize=False
        )


def batch(vocab: int) -> dict:
    """Three rows of 120 tokens, labels on the answers only, padding after (test_head's layout)."""
    ids = torch.randint(vocab, (3, 120), generator=torch.Generator().manual_seed(1))
    labels, attention = ids.clone(), torch.ones_like(ids)
    for row, (prompt, answer) in enumerate([(30, 90), (70, 20), (10, 60)]):
        labels[row, :prompt] = labels[row, prompt + answer :] = -100
        attention[row, prompt + answer :] = 0
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


@pytest.mark.slow
@pytest.mark.parametrize("family", families.FAMILIES)
def test_the_cpu_head_gives_trls_values_on_each_family(family):
    """Gemma 2's final soft-capping and tied head included: within 1e-6 (values), 1e-5 relative (gradients)."""
    model = net(family)
    inputs = batch(model.config.vocab_size)
    ours, our_grads = head_scored(model, inputs, cpu_head.cpu_head())
    trls, trl_grads = head_scored(model, inputs, nullcontext())
    for name in OUTPUTS:
        a, b = getattr(ours, name), getattr(trls, name)
        assert torch.equal(a, b) if a.dtype == torch.bool else torch.allclose(a, b, atol=1e-6, rtol=1e-6), (
            name
        )
    assert set(our_grads) == set(trl_grads) and our_grads
    for name, grad in trl_grads.items():
        assert (our_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-12, name


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", families.FAMILIES)
def test_the_packed_layouts_give_the_padded_batchs_values_or_are_refused(family, layout, monkeypatch):
    """Under the attention the Trainer runs (sdpa by segment; Gemma 2's eager with the layout's mask):
    without a window, each layout gives the padded batch's values within 1e-5; with one, a run asking for
    a layout is refused before weights load, and the layouts that attend past the window show why. (Under
    eager, padding-free alone keeps the window, its mask built by transformers from the packed row's
    positions; it is refused with the rest, as eager padding-free costs more than it saves.)"""
    model = net(family)
    own = "eager" if family == "gemma2" else "sdpa"
    model.config._attn_implementation = own
    inputs = edge_batch(model.config.vocab_size)  # rows of up to 40 tokens: past a 16-token window
    padded, padded_grads = scored(model, inputs)
    model.config._attn_implementation = segments.SEGMENTED if own == "sdpa" else own
    monkeypatch.setattr(model, "forward", segments.packed(model.forward, **LAYOUTS[layout]))
    ours, our_grads = scored(model, inputs)
    close = torch.allclose(ours.log_probs, padded.log_probs, rtol=1e-5, atol=1e-5)
    if family in WINDOWED:
        assert close == (own == "eager" and layout == "padding_free")
        asked = {"padding_free": ["train.padding_free=true"], "share_prompt": ["train.share_prompt=true"]}
        asked["both"] = asked["padding_free"] + asked["share_prompt"]
        assert "attend within a sliding window" in segments.refused(built(family, *asked[layout]))
        return
    assert close, (ours.log_probs - padded.log_probs).abs().max()
    for name in OUTPUTS:
        a, b = getattr(ours, name), getattr(padded, name)
        assert torch.equal(a, b) if a.dtype == torch.bool else torch.allclose(a, b, rtol=1e-5, atol=1e-5), (
            name
        )
    for name, grad in padded_grads.items():
        assert (our_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-12, name


@pytest.mark.slow
def test_a_tied_models_weights_are_predicted_once():
    """Gemma 2 9B ties its 256k-row embedding to its head: the prediction holds it once (9.3B, not 10.2B)."""
    shape = shapes.shape_of(
        config.build(config.compose([f"recipes={RECIPES['gemma2']}"])[0], "unused", machine=False)
    )
    counts = estimates._counts(shape)
    assert 9.2e9 < counts.weights < 9.35e9
    predicted = estimates.predict(shape).parts["policy weights"]
    assert predicted == pytest.approx(counts.weight_bytes / estimates.MB, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("family", families.FAMILIES)
def test_each_family_recipe_validates_offline_with_its_prediction(family, capsys):
    """`make validate RECIPE=<recipe> ARGS="hardware.memory_gb=24"`: the shipped config.json, no weights."""
    assert validate.main([f"recipes={RECIPES[family]}", "hardware.memory_gb=24"]) == 0
    out = capsys.readouterr().out
    assert "no weights loaded" in out and "predicted peak memory per GPU (1 x single)" in out


@pytest.mark.parametrize("family", families.FAMILIES)
def test_each_family_recipe_names_its_source_smoke_line_and_projections(family):
    recipe = RECIPES[family]
    text = (schema.RECIPES_DIR / f"{recipe}.yaml").read_text()
    assert f'make train RECIPE={recipe} ARGS="+smoke=tiny_{family} train.max_steps=4"' in text
    assert "llama3_lora_dpo.yaml" in text  # the published recipe its hyperparameters come from
    shipped, _ = config.compose([f"recipes={recipe}"])
    assert set(shipped.model.lora_target_modules) == PROJECTIONS and shipped.train.bf16
    smoked, _ = config.compose([f"recipes={recipe}", f"+smoke=tiny_{family}"])
    assert smoked.model.model_name_or_path == str(families.path(family))
    assert {k: v for k, v in smoked.model.items() if k != "model_name_or_path"} == {
        k: v for k, v in shipped.model.items() if k != "model_name_or_path"
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", families.FAMILIES)
def test_each_family_recipe_trains_as_it_ships_on_its_tiny_model(family, tmp_path):
    """The smoke line of the recipe's header (two steps, a short data set): from ln 2, its template's
    EOS learned, no lost update reported for the warm-up's first step at learning rate 0."""
    overrides = [f"recipes={RECIPES[family]}", f"+smoke=tiny_{family}", "train.max_steps=2"]
    trainer, metrics = run(tmp_path, [*overrides, "dataset.max_samples=12", "dataset.max_eval_samples=2"])
    assert trainer.state.global_step == 2
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and losses[0] == pytest.approx(math.log(2), abs=0.01)
    summary = json.loads((metrics / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["health"] == []
    assert trainer.processing_class.eos_token == ENDS[family]
    targets = json.loads((metrics.parent / "adapter_config.json").read_text())["target_modules"]
    assert set(targets) == PROJECTIONS
