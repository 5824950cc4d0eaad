"""The tiny offline model: deterministic, and loaded through the same path as a hub model."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_recipes.sources import tiny


@pytest.mark.slow
def test_same_seed_same_weights_and_tokenizer(tmp_path, monkeypatch):
    # Two builds by the same code, the tokenizer trained and the model pre-trained; 10 steps of pre-training
    # run every kernel the 150 do.
    monkeypatch.setitem(tiny.PRETRAIN, "steps", 10)
    for name in ("a", "b"):
        tiny.build(tmp_path / name)
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tiny.path() / "tokenizer.json").read_text()


@pytest.mark.slow
def test_loads_like_a_hub_model_with_a_chat_template():
    path = tiny.path()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert 1_000_000 < model.num_parameters() < 10_000_000
    messages = [{"role": "user", "content": "Tell me something cheerful about tea."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (
        text == "<|im_start|>user\nTell me something cheerful about tea.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"


@pytest.mark.slow
def test_the_tiny_qwen_has_qwen2_5_7bs_layout_and_real_tokenizer():
    path = tiny.qwen_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    c = model.config
    assert c.model_type == "qwen2" and model.dtype == torch.bfloat16
    assert c.vocab_size == 152064 and len(tokenizer) == 151665  # the 7B's padded vocabulary
    assert not c.tie_word_embeddings and c.num_key_value_heads < c.num_attention_heads
    attention = model.model.layers[0].self_attn
    assert all(getattr(attention, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
    assert attention.o_proj.bias is None
    assert model.num_parameters() < 25_000_000
    ids = tokenizer("<|im_start|>system\nYou are Qwen, created")["input_ids"]
    assert ids == [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert c.eos_token_id == tokenizer.eos_token_id


def test_the_tiny_qwen_builds_the_same_weights_twice(tmp_path):
    tiny.build_qwen(tmp_path / "a")
    tiny.build_qwen(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
