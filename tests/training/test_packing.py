"""Padding-free batches (`train.padding_free=true`): a micro-batch's sequences packed into one row give
what TRL's padded path gives, measured against it in the same test: per-token values within 1e-5
(relative and absolute), gradients within 1e-5 relative, a 20-step run's losses and grad norms within
1e-4."""

import itertools

import pytest
import torch
from conftest import LAYOUT, run, tiny_overrides
from test_head import OUTPUTS, model

from dpo_recipes import config
from dpo_recipes.training import segments, trainer

pytestmark = pytest.mark.slow


def edge_batch(vocab: int) -> dict:
    """Pairs right-padded as TRL's collator writes them (B chosen rows, then B rejected rows), as
    (prompt, chosen, rejected) lengths: a one-token answer, answers sharing their first 4 tokens, a row at
    the full length beside one with no label, and two pairs whose prompts differ as a left truncation
    leaves them, from the first token and from the fourth."""
    lengths = [(5, 1, 20), (12, 8, 8), (9, 31, 0), (6, 3, 5), (7, 4, 2)]
    width, pairs = max(p + max(c, r) for p, c, r in lengths), len(lengths)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(vocab, (2 * pairs, width), generator=generator)
    ids[pairs : pairs + 3, :9] = ids[:3, :9]  # the prompts (at most 9 tokens long among the first three)
    ids[pairs + 1, :16] = ids[1, :16]  # pair 1: the prompt and the first 4 answer tokens
    ids[2 * pairs - 1, :3] = ids[pairs - 1, :3]  # pair 4: the first 3 prompt tokens; pair 3: none
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for pair, (prompt, *answers) in enumerate(lengths):
        for row, answer in zip((pair, pair + pairs), answers, strict=True):
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


LAYOUTS = {"padding_free": {}, "share_prompt": {"share": True, "one_row": False}, "both": {"share": True}}


def test_a_call_the_layout_does_not_take_is_the_models_own():
    """Positional ids, no labels, a cache: what evaluation code, generation and users call a trained model
    with goes to its own forward, unchanged."""
    net = model(tied=False, lora=False)
    ids = torch.randint(net.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = net(ids).logits
        net.forward = segments.packed(net.forward, share=True)
        assert torch.equal(net(ids).logits, want)
        assert torch.equal(net(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, want)
        assert torch.equal(net(ids, use_cache=True).logits, want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("attention", ["sdpa", "eager", segments.SEGMENTED])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_each_layout_gives_the_padded_batchs_values_and_gradients(
    family, attention, lora, layout, monkeypatch
):
    """Under sdpa and eager, the layout's mask; under `segments.SEGMENTED` (what the Trainer runs sdpa as),
    attention segment by segment, against sdpa's padded batch."""
    net = model(tied=False, lora=lora) if family == "llama" else qwen2(lora)
    net.config._attn_implementation = "sdpa" if attention == segments.SEGMENTED else attention
    inputs = edge_batch(net.config.vocab_size)
    padded, padded_grads = scored(net, inputs)
    net.config._attn_implementation = attention
    base = net.get_base_model() if lora else net
    monkeypatch.setattr(base, "forward", segments.packed(base.forward, **LAYOUTS[layout]))
    ours, our_grads = scored(net, inputs)
    for name in (*OUTPUTS, "label_mask"):
        a, b = getattr(ours, name), getattr(padded, name)
        assert a.shape == b.shape == (10, inputs["input_ids"].size(1) - 1), name
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, (a - b).abs().max())
    assert set(our_grads) == set(padded_grads) and our_grads
    for name, grad in padded_grads.items():
        assert (our_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-12, name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_by_segment_under_activation_checkpointing(layout, monkeypatch):
    """The backward recomputes each layer from its inputs, the layout's segments among them: the same
    values and gradients as the padded batch (LoRA, as the 7B recipes checkpoint it), within 1e-5."""
    net = model(tied=False, lora=True)
    net.train()
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    net.enable_input_require_grads()
    net.config._attn_implementation = "sdpa"
    inputs = edge_batch(net.config.vocab_size)
    padded, padded_grads = scored(net, inputs)
    base = net.get_base_model()
    net.config._attn_implementation = segments.SEGMENTED
    monkeypatch.setattr(base, "forward", segments.packed(base.forward, **LAYOUTS[layout]))
    ours, our_grads = scored(net, inputs)
    assert torch.allclose(ours.log_probs, padded.log_probs, rtol=1e-5, atol=1e-5)
    assert set(our_grads) == set(padded_grads) and our_grads
    for name, grad in padded_grads.items():
        assert (our_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-12, name


def test_flex_attention_gives_the_padded_batchs_values_in_each_layout(monkeypatch):
    """Forward only: PyTorch has no flex attention backward on CPU (training with it there is refused,
    rule flex_on_cpu). The shared layouts' block mask (`segments.share_mask`) and the mask transformers
    derives from a packed row's positions give the padded sdpa batch's values within 1e-5. Each shape
    compiles on its own: PyTorch 2.13's CPU flex kernel does not build with dynamic shapes."""
    net = model(tied=False, lora=False)
    inputs = edge_batch(net.config.vocab_size)
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        net.config._attn_implementation = "sdpa"
        padded = net(**inputs, fused_lm_head=True, use_cache=False)
        net.config._attn_implementation = "flex_attention"
        forward = net.forward
        for layout, how in LAYOUTS.items():
            monkeypatch.setattr(net, "forward", segments.packed(forward, **how))
            ours = net(**inputs, fused_lm_head=True, use_cache=False)
            for name in OUTPUTS:
                a, b = getattr(ours, name).float(), getattr(padded, name).float()
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (layout, name, (a - b).abs().max())


def test_the_block_mask_lists_the_blocks_the_mask_allows():
    """The compiled block mask, shape after shape (recompiled for dynamic shapes after the first, as in
    training): a 128 x 128 block is listed exactly where the dense mask allows a pair in it, and its
    token-level mask is the dense one. Past the first shapes, a new shape and a new batch's mask compile
    nothing more: training never reaches dynamo's recompile limit, past which the dense mask is built."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import create_mask

    generator = torch.Generator().manual_seed(0)
    graphs, skipped = [], False
    for rows, length in [(2, 300), (3, 260), (1, 700), (2, 333), (4, 129), (1, 901)]:
        where = [
            torch.randint(0, 4, (rows, length), generator=generator).sort(1).values,  # sequences
            torch.randint(0, length, (rows, length), generator=generator),  # columns
            torch.randint(0, 2, (rows, length), generator=generator),  # branches
            torch.rand(rows, length, generator=generator) < 0.3,  # shared
        ]
        block, dense = segments.share_mask(where, "flex_attention"), segments.share_mask(where, "sdpa")
        assert torch.equal(create_mask(block.mask_mod, rows, 1, length, length), dense)
        side = -(-length // 128) * 128
        tiles = torch.nn.functional.pad(dense, (0, side - length, 0, side - length))
        tiles = tiles.reshape(rows, 1, side // 128, 128, side // 128, 128).any(5).any(3)
        assert torch.equal(block.to_dense().bool(), tiles)
        graphs.append(counters["stats"]["unique_graphs"])
        skipped = skipped or not tiles.all()
    assert skipped  # some block is left out: the listing was tested, not just all blocks
    assert graphs[2] == graphs[-1]  # measured: 3 graphs over the first 3 shapes, none over 11 more


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A trainer of the tiny full fine-tuning recipe on the 300 real UltraFeedback-layout pairs (varied
    prompt and answer lengths, some at the 256-token limit and truncated), with its reference copy."""
    import copy

    from transformers import AutoModelForCausalLM

    from dpo_recipes.sources import tiny
    from dpo_recipes.training import chat, data

    out = tmp_path_factory.mktemp("packing")
    overrides = tiny_overrides(
        "tiny_full_dpo", "dataset=real_ultrafeedback", "dataset.max_samples=null", "train.max_length=256",
        "train.eval_strategy=no", *LAYOUT["padded"],
    )  # fmt: skip
    built = config.build(config.compose(overrides)[0], out)
    train_set, _, _ = data.load(built.dataset, built.args.seed)
    policy = AutoModelForCausalLM.from_pretrained(tiny.path(), dtype="float32")
    return trainer.RecipeTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy),
        args=built.args,
        train_dataset=train_set,
        processing_class=chat.tokenizer(built),
    )


def test_every_real_batch_gives_trls_per_sequence_log_probs_in_each_layout(real, monkeypatch):
    """The policy's; the reference (a copy, the same weights) goes through the same forward, and the runs
    below compare what the Trainer wraps: policy and reference."""

    def logps() -> list:
        with torch.no_grad(), real._head():
            return [real.compute_ref_log_probs(real.model, b) for b in real.get_train_dataloader()]

    forward, config = real.model.forward, real.model.config
    padded = logps()
    for attention, (layout, how) in itertools.product(["sdpa", segments.SEGMENTED], LAYOUTS.items()):
        monkeypatch.setattr(config, "_attn_implementation", attention)
        monkeypatch.setattr(real.model, "forward", segments.packed(forward, **how))
        for ours, theirs in zip(logps(), padded, strict=True):
            for a, b in zip(ours, theirs, strict=True):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (attention, layout, (a - b).abs().max())
    assert sum(len(chosen) for chosen, _ in padded) == len(real.train_dataset) > 75  # each pair


# Each reference strategy's run-level comparison: (recipe, steps, data, learning rate, the layouts run).
RUNS = {
    "adapter": ("tiny_lora_dpo", 20, "toy", 5e-4, ("padding_free", "both")),
    "precomputed": ("tiny_lora_dpo", 2, "real_ultrafeedback", 5e-6, ("share_prompt",)),
    "copy": ("tiny_full_dpo", 2, "toy", 5e-5, ("both",)),
    "path": ("tiny_full_dpo", 4, "toy", 5e-5, ("share_prompt", "both")),
    "sft_adapter": ("tiny_lora_dpo", 4, "toy", 5e-4, ("padding_free", "both")),
}


def made_reference(strategy: str, where) -> list[str]:
    """The reference a strategy reads from disk, unlike the policy so that the rewards are not ties:
    `path`, the tiny base with every weight moved by noise; `sft_adapter`, a non-zero LoRA adapter on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_recipes.sources import tiny

    if strategy not in ("path", "sft_adapter"):
        return []
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(tiny.path())
    if strategy == "path":
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        AutoTokenizer.from_pretrained(tiny.path()).save_pretrained(where)
    else:
        net = get_peft_model(net, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    net.save_pretrained(where)
    return [f"reference.path={where}"]


@pytest.mark.parametrize("reference", RUNS)
def test_each_layouts_run_logs_the_padded_runs_numbers(reference, tmp_path, capsys):
    """The first step's every logged number within 1e-5, then the loss and grad-norm trajectories within
    1e-4 (relative): the reference by the disabled adapter over 20 steps of the default recipe at lr 5e-4
    (at its own 5e-3, float rounding grows to 1.3e-4 by step 13, as between two CPUs' kernels); a
    precomputed reference (laid out the same way) for 2 steps on the real data, at lr 5e-6, its grad
    norm within 2e-4: the first step's is 287 with the policy's rewards against a reference of the same
    weights ties, decided by rounding (4.3e-5 apart even at lr 0), and Adam's first update moves each
    weight by about lr times the sign of its gradient, so the signs of near-zero gradients move the
    second step's (measured, attending by segment: 1.6e-4 at 5e-6, 1.1e-4 at 5e-7; under one explicit
    mask, 3e-5 at 5e-6 and 1.5e-4 at 5e-5 on an AMD EPYC with AVX-512); the reference copy of full
    fine-tuning for 2 steps; a reference from its own path (full fine-tuning) and an SFT adapter's
    frozen copy for 4 steps. Under sdpa each layout runs as `segments.SEGMENTED`, with no note of packing
    costing more there."""
    recipe, steps, data, lr, layouts = RUNS[reference]
    overrides = tiny_overrides(
        recipe, f"dataset={data}", f"reference={reference}", f"++train.max_steps={steps}",
        f"++train.eval_steps={steps}", f"train.learning_rate={lr}",
        *made_reference(reference, tmp_path / "reference"),
    )  # fmt: skip
    padded, _ = run(tmp_path / "padded", [*overrides, *LAYOUT["padded"]])
    assert not padded.packing and not padded.share_prompt
    expected = padded.state.log_history
    assert sum("loss" in e for e in expected) == steps
    first = {k: v for k, v in expected[0].items() if isinstance(v, float)}
    if reference == "precomputed":  # the policy equals the reference only up to rounding here, so the
        # first step's rewards are ties decided by it; its grad norm (270, long real rows) is 2e-5 apart
        first = {k: v for k, v in first.items() if k == "loss"}
    for layout in layouts:
        capsys.readouterr()
        ours, _ = run(tmp_path / layout, [*overrides, *LAYOUT[layout]])
        assert (ours.packing, ours.share_prompt) == (layout != "share_prompt", layout != "padding_free")
        assert "note: train.padding_free" not in capsys.readouterr().err  # sdpa attends by segment
        for net in (ours.model, ours.ref_model) if ours.ref_model is not None else (ours.model,):
            assert net.config._attn_implementation == segments.SEGMENTED
        history = ours.state.log_history
        assert len(history) == len(expected) and first and set(history[0]) == set(expected[0])
        for k, v in first.items():
            assert history[0][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (layout, k)
        for key, rel in (("loss", 1e-4), ("grad_norm", 2e-4 if reference == "precomputed" else 1e-4)):
            got, want = ([e[key] for e in h if key in e] for h in (history, expected))
            assert got == pytest.approx(want, rel=rel), (layout, key)


def test_padding_free_under_eager_attention_says_what_it_costs(tmp_path, capsys):
    """Eager attention takes a packed row's mask over all of its tokens: the run keeps eager (no
    attention by segment) and says so when it starts."""
    overrides = tiny_overrides("tiny_lora_dpo", "model.attn_implementation=eager", "++train.max_steps=1")
    ours, _ = run(tmp_path, [*overrides, *LAYOUT["both"]])
    assert ours.packing and ours.model.get_base_model().config._attn_implementation == "eager"
    assert "note: train.padding_free under eager attention" in capsys.readouterr().err
