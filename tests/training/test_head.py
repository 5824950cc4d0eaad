"""The CPU log-prob head: TRL's own arithmetic on labelled positions only, in cache-sized tiles, gives
TRL's per-token values within 1e-6 relative (log-probs near -9 are one fp32 ulp, 9.5e-7, apart: the
folds run in another order) and gradients within 1e-5 relative, on small random models."""

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from dpo_recipes.config import check, compose
from dpo_recipes.errors import ConfigError
from dpo_recipes.training import cpu_head, trainer

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # all TRL's DPO reads
VOCAB = 9000  # over two vocabulary tiles
TOKENS = 3 * 120  # over one token tile


def model(tied: bool, lora: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    net = LlamaForCausalLM(config)
    add_fused_lm_head(net, outputs=OUTPUTS)
    if lora:
        adapter = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        net = get_peft_model(net, adapter)
    return net


def batch(masked_everywhere: bool = False) -> dict:
    """Three rows of 120 tokens: a prompt, an answer, padding; labels only on the answers."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(VOCAB, (3, TOKENS // 3), generator=generator)
    labels = ids.clone()
    attention = torch.ones_like(ids)
    for row, (prompt, answer) in enumerate([(30, 90), (70, 20), (10, 60)]):
        labels[row, :prompt] = -100
        labels[row, prompt + answer :] = -100
        attention[row, prompt + answer :] = 0
    if masked_everywhere:
        labels[:] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def scored(net, inputs: dict, head) -> tuple:
    net.zero_grad()
    with head:
        out = net(**inputs, fused_lm_head=True, use_cache=False)
        (out.log_probs.sum() + out.entropy.sum()).backward()  # DPO's loss reads both gradients' paths
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_cpu_head_gives_trls_log_probs_and_gradients(tied, lora):
    from contextlib import nullcontext

    net, inputs = model(tied, lora), batch()
    ours, our_grads = scored(net, inputs, cpu_head.cpu_head())
    trls, trl_grads = scored(net, inputs, nullcontext())
    mask = inputs["labels"][:, 1:] != -100
    for name in OUTPUTS:
        a, b = getattr(ours, name), getattr(trls, name)
        assert a.shape == b.shape == mask.shape
        if name == "is_top1":
            assert torch.equal(a, b)
        else:
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-6), name
            assert not a[~mask].any()  # zero where there is no label, as TRL's
    assert set(our_grads) == set(trl_grads) and our_grads
    for name, grad in trl_grads.items():
        assert (our_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-12, name
    if lora:
        assert not any("lora" not in n for n in trl_grads)  # the adapter trains, the base does not


def test_cpu_head_scores_only_the_labelled_positions_in_cache_sized_tiles(monkeypatch):
    from contextlib import nullcontext

    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as utils

    seen, original = [], utils._ChunkedLogProbFunction

    class Spy:
        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, vocab_tile, *rest):
            seen.append((hidden.shape[0], chunked.TOKEN_CHUNK_SIZE, vocab_tile))
            return original.apply(hidden, weight, bias, targets, temperature, vocab_tile, *rest)

    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", Spy)
    net, inputs = model(tied=False, lora=False), batch()
    scored(net, inputs, cpu_head.cpu_head())
    scored(net, inputs, nullcontext())
    labelled = int((inputs["labels"][:, 1:] != -100).sum())
    every = inputs["input_ids"].numel() - 3  # each row's last position has no next token
    assert seen == [(labelled, 256, 4096), (every, 4096, 32768)]


def test_cpu_head_scores_an_all_masked_micro_batch_as_a_differentiable_zero():
    net = model(tied=False, lora=False)
    out, grads = scored(net, batch(masked_everywhere=True), cpu_head.cpu_head())
    assert not out.log_probs.any() and out.log_probs.requires_grad
    assert all(not g.any() for g in grads.values())


def test_cpu_head_restores_trls_settings_on_the_way_out():
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as utils

    before = utils._use_triton, utils._CHUNKED_LOGPROB_CHUNK_SIZE, chunked.TOKEN_CHUNK_SIZE
    with pytest.raises(RuntimeError), cpu_head.cpu_head():
        assert (
            utils._use_triton(torch.device("cpu")) and cpu_head.CPU_TILE["TOKENS"] == chunked.TOKEN_CHUNK_SIZE
        )
        raise RuntimeError
    assert (utils._use_triton, utils._CHUNKED_LOGPROB_CHUNK_SIZE, chunked.TOKEN_CHUNK_SIZE) == before
    assert not utils._use_triton(torch.device("cpu"))


def test_the_names_the_head_relies_on_are_checked():
    names = {name for owner, name, _ in trainer.RELIED_ON}
    assert {"_use_triton", "_CHUNKED_LOGPROB_CHUNK_SIZE", "TOKEN_CHUNK_SIZE"} <= names
    assert trainer.changed_in_trl() == []


@pytest.mark.parametrize("targets", ["[q_proj,lm_head]", "lm_head"])
def test_lora_on_lm_head_is_refused(targets):
    cfg, _ = compose([f"model.lora_target_modules={targets}"])
    with pytest.raises(ConfigError, match="lm_head: TRL's fused log-prob head"):
        check(cfg, machine=False)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["mpo", "wpo"])  # sigmoid + bco_pair + sft; WPO's weights (log_sum_sq_probs)
def test_a_run_with_the_cpu_head_logs_what_trls_head_gives(loss, tmp_path, monkeypatch):
    from contextlib import nullcontext

    from conftest import LAYOUT, tiny_overrides

    from dpo_recipes import train

    overrides = tiny_overrides("tiny_lora_dpo", f"loss={loss}", "++train.eval_steps=1", *LAYOUT["padded"])
    cfg, recipe = compose(overrides)  # padded, as TRL lays batches out
    ours = train.run(cfg, tmp_path / "ours", recipe).state.log_history
    monkeypatch.setattr(trainer, "cpu_head", nullcontext)  # TRL's head as shipped
    trls = train.run(cfg, tmp_path / "trl", recipe).state.log_history
    assert len(ours) == len(trls)
    for a, b in zip(ours, trls, strict=True):
        numbers = {
            k for k, v in b.items() if isinstance(v, float) and "runtime" not in k and "per_second" not in k
        }
        assert numbers and set(a) == set(b)
        for k in numbers:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
