"""Padding-free batches (`train.padding_free=true`): a micro-batch's sequences packed into one row give
what TRL's padded path gives, measured against it in the same test: per-token values within 1e-5
(relative and absolute), gradients within 1e-5 relative, a 20-step run's losses and grad norms within
1e-4."""

import pytest
import torch
from conftest import run, tiny_overrides
from test_head import OUTPUTS, model

from dpo_recipes import config, trainer

pytestmark = pytest.mark.slow


def edge_batch(vocab: int) -> dict:
    """Right-padded rows as TRL's collator writes them: (prompt, answer) lengths with an answer of one
    token, a row at the full length, a pair sharing its answer's first tokens, and a row with no label."""
    lengths = [(5, 1), (3, 20), (9, 31), (12, 8), (12, 8), (4, 0)]
    width = max(p + a for p, a in lengths)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(vocab, (len(lengths), width), generator=generator)
    ids[4, :16] = ids[3, :16]  # rows 3 and 4: the same prompt and the first 4 answer tokens
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (prompt, answer) in enumerate(lengths):
        attention[row, : prompt + answer] = 1
        labels[row, prompt : prompt + answer] = ids[row, prompt : prompt + answer]
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def scored(net, inputs: dict) -> tuple:
    net.zero_grad()
    out = net(**inputs, fused_lm_head=True, use_cache=False)
    (out.log_probs.sum() + out.entropy.sum()).backward()
    return out, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def qwen2(lora: bool):
    """test_head's random Llama as a Qwen2 (biases on q, k, v), tied embeddings as the small Qwens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    llama = model(tied=True, lora=False).config.to_dict()
    shape = {k: llama[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
    heads = {k: llama[k] for k in ("num_attention_heads", "num_key_value_heads", "tie_word_embeddings")}
    net = Qwen2ForCausalLM(Qwen2Config(**shape, **heads))
    add_fused_lm_head(net, outputs=OUTPUTS)
    if lora:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return net


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_packed_row_gives_the_padded_batchs_values_and_gradients(family, attention, lora, monkeypatch):
    net = model(tied=False, lora=lora) if family == "llama" else qwen2(lora)
    net.config._attn_implementation = attention
    inputs = edge_batch(net.config.vocab_size)
    padded, padded_grads = scored(net, inputs)
    base = net.get_base_model() if lora else net
    monkeypatch.setattr(base, "forward", trainer.packed(base.forward))
    ours, our_grads = scored(net, inputs)
    for name in (*OUTPUTS, "label_mask"):
        a, b = getattr(ours, name), getattr(padded, name)
        assert a.shape == b.shape == (6, inputs["input_ids"].size(1) - 1), name
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, (a - b).abs().max())
    assert set(our_grads) == set(padded_grads) and our_grads
    for name, grad in padded_grads.items():
        assert (our_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-12, name


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A trainer of the tiny full fine-tuning recipe on the 300 real UltraFeedback-layout pairs (varied
    prompt and answer lengths, some at the 256-token limit and truncated), with its reference copy."""
    import copy

    from transformers import AutoModelForCausalLM

    from dpo_recipes import data, models, tiny

    out = tmp_path_factory.mktemp("packing")
    overrides = tiny_overrides(
        "tiny_full_dpo", "dataset=real_ultrafeedback", "dataset.max_samples=null", "train.max_length=256",
        "train.eval_strategy=no",
    )  # fmt: skip
    built = config.build(config.compose(overrides)[0], out)
    train_set, _, _ = data.load(built.dataset, built.args.seed)
    policy = AutoModelForCausalLM.from_pretrained(tiny.path(), dtype="float32")
    return trainer.Trainer(
        model=policy,
        ref_model=copy.deepcopy(policy),
        args=built.args,
        train_dataset=train_set,
        processing_class=models.tokenizer(built),
    )


def test_every_real_batch_gives_trls_per_sequence_log_probs_for_policy_and_reference(real, monkeypatch):
    def logps() -> list:
        with torch.no_grad(), real._head():
            return [real.compute_ref_log_probs(m, b) for b in real.get_train_dataloader() for m in models]

    models = (real.model, real.ref_model)
    padded = logps()
    for m in models:
        monkeypatch.setattr(m, "forward", trainer.packed(m.forward))
    for ours, theirs in zip(logps(), padded, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
    assert sum(len(chosen) for chosen, _ in padded) == 2 * len(real.train_dataset) > 150  # each row, twice


@pytest.mark.parametrize("reference", ["auto", "precomputed"])
def test_a_padding_free_run_logs_the_padded_runs_numbers(reference, tmp_path):
    """The first step's every logged number within 1e-5, then the loss and grad-norm trajectories within
    1e-4 (relative): the reference by the disabled adapter over 20 steps of the default recipe at lr
    5e-4 (at its own 5e-3, float rounding grows to 1.3e-4 by step 13, as between two CPUs' kernels); a
    precomputed reference (packed the same way) for 2 steps on the real data. The reference copy of
    full fine-tuning is the real-batch test's."""
    steps, data = (20, "dataset=toy") if reference == "auto" else (2, "dataset=real_ultrafeedback")
    overrides = tiny_overrides(
        "tiny_lora_dpo", data, f"reference={reference}", f"++train.max_steps={steps}",
        f"++train.eval_steps={steps}", "train.learning_rate=5e-4",
    )  # fmt: skip
    padded, _ = run(tmp_path / "padded", overrides)
    ours, _ = run(tmp_path / "packed", [*overrides, "++train.padding_free=true"])
    assert ours.packing and not padded.packing
    history, expected = ours.state.log_history, padded.state.log_history
    assert len(history) == len(expected) and sum("loss" in e for e in expected) == steps
    first = {k: v for k, v in expected[0].items() if isinstance(v, float)}
    if reference == "precomputed":  # the policy equals the reference only up to rounding here, so the
        # first step's rewards are ties decided by it; its grad norm (270, long real rows) is 2e-5 apart
        first = {k: v for k, v in first.items() if k == "loss"}
    assert first and set(history[0]) == set(expected[0])
    for k, v in first.items():
        assert history[0][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    for key in ("loss", "grad_norm"):
        got, want = ([e[key] for e in h if key in e] for h in (history, expected))
        assert got == pytest.approx(want, rel=1e-4), key
