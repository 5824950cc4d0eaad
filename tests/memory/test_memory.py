"""Will it fit: the predicted peak against the peak measured on real tensors, the verdict and its fixes,
hardware.micro_batch=auto, and the docs' table."""

import copy
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import LAYOUT, run

from dpo_recipes import ROOT, config, errors, validate
from dpo_recipes.config import rules, views
from dpo_recipes.memory import cards, estimates, preflight, shapes, trace
from dpo_recipes.training import cpu_head

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "river",
    "stone",
    "light",
    "cloud",
    "market",
    "garden",
    "window",
    "silver",
    "paper",
    "music",
]


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory):
    """Short prompts, answers far longer than max_length: every sequence of every batch fills max_length,
    the length the prediction plans for."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("long") / "train.jsonl"
    with path.open("w") as f:
        for i in range(64):
            answers = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(2)]
            f.write(
                json.dumps(
                    {
                        "prompt": f"Question {i}: tell me a story.",
                        "chosen": answers[0],
                        "rejected": answers[1],
                    }
                )
            )
            f.write("\n")
    return path


def built(*overrides: str):
    cfg, _ = config.compose(list(overrides))
    return config.build(cfg, "unused", machine=False)


# LoRA and full, each reference strategy that holds something different, checkpointing on and off,
# micro-batch 1 and 4, on the tiny Llama and the tiny Qwen (Qwen2.5's 152k vocabulary)
MEASURED = [
    ("recipes=tiny_lora_dpo", "train.per_device_train_batch_size=1"),
    ("recipes=tiny_lora_dpo", "train.per_device_train_batch_size=4", "train.activation_checkpointing=true"),
    ("recipes=tiny_lora_dpo", "train.per_device_train_batch_size=4", "reference=precomputed"),
    ("recipes=tiny_full_dpo", "train.per_device_train_batch_size=4"),
    ("recipes=tiny_full_dpo", "train.per_device_train_batch_size=1", "reference=precomputed"),
    ("recipes=tiny_full_dpo", "train.per_device_train_batch_size=4", "train.activation_checkpointing=true"),
    ("recipes=qwen7b_lora_dpo", "+smoke=tiny_qwen", "train.per_device_train_batch_size=4"),
    ("recipes=qwen7b_full_dpo", "+smoke=tiny_qwen", "train.per_device_train_batch_size=1"),
]
KTO = [
    ("recipes=tiny_kto", "train.per_device_train_batch_size=4"),
    ("recipes=qwen7b_lora_kto", "+smoke=tiny_qwen", "train.per_device_train_batch_size=4"),
]

NO_REFERENCE = [
    ("recipes=tiny_orpo", "train.per_device_train_batch_size=4"),
    ("recipes=tiny_simpo", "train.per_device_train_batch_size=4"),
    ("recipes=qwen7b_lora_orpo", "+smoke=tiny_qwen", "train.per_device_train_batch_size=4"),
]


def measured(tmp_path, long_rows, overrides) -> tuple[float, float]:
    """A 2-step run on rows that fill max_length 64: its (predicted, measured) peak from summary.json."""
    data = [
        f"dataset.path={long_rows}",
        "dataset.eval_path=null",
        "dataset.format=trl",
        "train.max_length=64",
    ]
    steps = ["train.max_steps=2", "train.eval_strategy=no", "train.save_strategy=no", "logger=none"]
    _, metrics = run(tmp_path, [*overrides, *data, *steps])
    record = json.loads((metrics / "summary.json").read_text())["memory"]
    assert record["measured_by"].startswith("MemTracker") and record["measured_peak_mb"] > 0
    assert record["sequence_length"] == 64 and record["budget_mb"] is None
    return record["predicted_peak_mb"], record["measured_peak_mb"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", MEASURED, ids=lambda o: " ".join(o))
def test_the_predicted_peak_is_within_10_percent_of_the_measured_one(overrides, long_rows, tmp_path):
    """The run predicts its peak before weights load and measures it with the same tracker on the real
    tensors of its first two steps; summary.json holds both. Batches padded, as the prediction counts."""
    predicted, peak = measured(tmp_path, long_rows, [*overrides, *LAYOUT["padded"]])
    assert abs(predicted / peak - 1) <= 0.10, (predicted, peak)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", KTO, ids=lambda o: " ".join(o))
def test_a_kto_step_is_predicted_as_a_dpo_step_on_half_as_many_pairs(overrides, long_rows, tmp_path):
    """Its rows through the same head, each against the reference, and a KL pass holding no activations:
    within 15% of the measured peak (over it: 1.11x on the tiny Llama, 1.07x on the tiny Qwen)."""
    predicted, peak = measured(tmp_path, long_rows, list(overrides))
    assert abs(predicted / peak - 1) <= 0.15, (predicted, peak)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", NO_REFERENCE, ids=lambda o: " ".join(o))
def test_an_orpo_or_simpo_step_is_predicted_without_a_reference_and_with_the_whole_logits(
    overrides, long_rows, tmp_path
):
    """No reference pass, and the vocabulary's logits held as TRL's trainers hold them (with the NLL of
    the chosen answers over them): within 15% of the measured peak (over it: 1.06x on the tiny Llama,
    1.11x on the tiny Qwen under bf16)."""
    predicted, peak = measured(tmp_path, long_rows, list(overrides))
    assert abs(predicted / peak - 1) <= 0.15, (predicted, peak)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tiny_lora_dpo", "tiny_full_dpo"])
def test_a_layouts_peak_stays_under_the_padded_prediction(recipe, long_rows, tmp_path):
    """The tiny recipes ship padding-free with the prompt shared: fewer tokens than the padded batch the
    prediction counts, so the prediction is an upper bound there (measured on these rows, whose short
    prompts leave little to share: 1.08x the peak for LoRA, 1.06x for full fine-tuning)."""
    predicted, peak = measured(
        tmp_path, long_rows, [f"recipes={recipe}", "train.per_device_train_batch_size=4"]
    )
    assert peak <= predicted <= 1.15 * peak, (predicted, peak)


def test_a_deep_model_predicted_from_two_and_three_layers_matches_its_whole_trace():
    """The extrapolation: a 6-layer model's peak from traces of 2 and 3 layers equals tracing all 6, for
    LoRA (its peak while activations are held) and full fine-tuning (its peak while gradients are)."""
    for recipe in ("tiny_lora_dpo", "tiny_full_dpo"):
        shape = shapes.shape_of(
            built(f"recipes={recipe}", "train.per_device_train_batch_size=2", "train.max_length=64")
        )
        deep = copy.deepcopy(shape.config)
        deep.num_hidden_layers = 6
        shape = dataclasses.replace(shape, config=deep)
        whole = max(trace.trace(shape, 6), key=lambda kinds: kinds["Total"])["Total"] / trace.MB
        assert estimates.predict(shape).peak_mb == pytest.approx(whole, rel=0.01), recipe


def test_the_length_planned_for_is_the_longest_row_make_prep_counted_with_the_runs_tokenizer(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text((ROOT / "data/toy/train.jsonl").read_text())
    spec = built(
        "recipes=tiny_lora_dpo", f"dataset.path={data}", "dataset.eval_path=null", "train.max_length=512"
    )
    tokenizer = spec.model.model_name_or_path
    assert shapes.data_length(spec.dataset, 512, tokenizer) == 512  # no report: max_length
    lengths = {"prompt": {"max": 40}, "chosen": {"max": 100}, "rejected": {"max": 70}}
    report = tmp_path / "pairs.jsonl.report.json"
    counted = {"tokenizer": str(Path(tokenizer).resolve()), "chat_template": "its own"}
    report.write_text(json.dumps({"token_lengths": lengths, "counted_with": counted}))
    assert shapes.data_length(spec.dataset, 512, tokenizer) == 140
    assert shapes.data_length(spec.dataset, 128, tokenizer) == 128
    assert shapes.shape_of(spec).length == 140 and not any(
        "not used" in x for x in preflight.preflight(spec).lines
    )
    # counted with another tokenizer, with a template the run replaces, or by an older report: not used
    for counted_with, template in ({"tokenizer": "Qwen/Qwen2.5-7B"}, None), (counted, "chatml"), (None, None):
        report.write_text(json.dumps({"token_lengths": lengths, "counted_with": counted_with}))
        assert shapes.data_length(spec.dataset, 512, tokenizer, template) == 512
    assert shapes.shape_of(spec).length == 512
    assert any("pairs.jsonl.report.json are not used" in line for line in preflight.preflight(spec).lines)


def test_prediction_leaves_the_runs_lora_config_as_it_was():
    run_spec = built("recipes=tiny_lora_dpo")
    targets = copy.deepcopy(run_spec.peft.target_modules)
    preflight.preflight(run_spec)
    assert run_spec.peft.target_modules == targets  # PEFT rewrites the config it gets; the run's is kept


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
def test_the_traced_head_leaves_trls_head_as_it_was(cuda):
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as trl_utils

    names = [(trl_utils, "_use_triton"), (trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"), (chunked, "_use_triton")]
    names += [(chunked, n) for n in ("TOKEN_CHUNK_SIZE", "_forward_tile", "_backward_tile", "_addmm_fp32")]
    before = [getattr(owner, name) for owner, name in names]
    with trace._head(cuda):
        assert len(list(chunked.range(5))) == 1 and not trl_utils._use_triton(torch.device("cuda"))
        assert cuda == (cpu_head.CPU_TILE["TOKENS"] != chunked.TOKEN_CHUNK_SIZE)
    assert [getattr(owner, name) for owner, name in names] == before and not hasattr(chunked, "range")


@pytest.mark.slow  # no weights, but a 7B model's traces take seconds
def test_validate_prints_the_breakdown_and_the_verdict_for_a_7b_recipe(capsys):
    assert validate.main(["recipes=qwen7b_lora_dpo", "hardware.memory_gb=48"]) == 0
    out = capsys.readouterr().out
    for words in (
        "predicted peak memory per GPU",
        "policy weights",
        "optimizer states",
        "activations",
        "CUDA allocator and context",
        "fits in 48 GiB",
        "largest micro-batch that fits, same effective batch 16",
    ):
        assert words in out


@pytest.mark.slow
def test_validate_of_a_run_that_cannot_fit_lists_fixes_that_would(capsys):
    """The full recipe on one 24 GiB GPU: refused; each `hardware=zero3 NPROC=N` it offers is no lower
    than DeepSpeed's own estimate of the model states alone at N GPUs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    assert validate.main(["recipes=qwen7b_full_dpo", "hardware=gpu", "hardware.memory_gb=24"]) == 2
    err = capsys.readouterr().err
    assert "the run does not fit in 24 GiB" in err
    fixes = [line for line in err.splitlines() if line.startswith("  ") and line.endswith("GiB)")]
    fixes = [line for line in fixes if "  (" in line]
    sharded = [line for line in fixes if "hardware=zero3 NPROC=" in line]
    assert sharded and all(float(line.rsplit("(", 1)[1].split()[0]) <= 24 for line in fixes)
    for line in sharded:
        gpus = int(line.split("NPROC=")[1].split()[0])
        _, states, _ = estimate_zero3_model_states_mem_needs(
            QWEN7B_PARAMS, QWEN7B_EMBEDDING, num_gpus_per_node=gpus, cpu_offload=False
        )
        assert float(line.rsplit("(", 1)[1].split()[0]) * 2**30 >= states, line


def test_a_run_that_cannot_fit_is_refused_before_weights_load_or_its_dir_exists(tmp_path):
    spec = built("recipes=tiny_lora_dpo")
    eight = estimates.predict(shapes.shape_of(spec)).peak_mb
    budget = f"hardware.memory_gb={eight * 0.6 / 1024:.4f}"  # micro-batch 8 does not fit; a smaller one does
    with pytest.raises(errors.TooBig) as refused:
        run(tmp_path, ["recipes=tiny_lora_dpo", budget])
    message = str(refused.value)
    assert "the run does not fit in" in message and "train.per_device_train_batch_size=" in message
    assert not (tmp_path / "run").exists()


def test_micro_batch_auto_takes_the_largest_that_fits_at_the_same_effective_batch():
    shape = shapes.shape_of(built("recipes=tiny_lora_dpo"))  # 8 x 1
    two, four = (estimates.predict(dataclasses.replace(shape, batch=b)).peak_mb for b in (2, 4))
    budget = (two + four) / 2 / 1024
    spec = built("recipes=tiny_lora_dpo", "hardware.micro_batch=auto", f"hardware.memory_gb={budget}")
    verdict = preflight.preflight(spec)
    assert verdict.batch == (2, 4) and spec.args.per_device_train_batch_size == 8  # the plan, not applied
    assert verdict.record["micro_batch"] == 2 and "micro-batch 2 x accumulation 4" in verdict.lines[0]
    rebatched = config.with_batch(spec, *verdict.batch).args
    assert (rebatched.per_device_train_batch_size, rebatched.gradient_accumulation_steps) == (2, 4)


@pytest.mark.parametrize(
    "ratio, outcome",
    [(1.20, "fits in"), (1.05, "warning: within 10%"), (0.95, "warning: within 10%"), (0.8, None)],
)
def test_the_verdict_near_the_limit_warns_and_beyond_it_refuses(ratio, outcome):
    spec = built("recipes=tiny_lora_dpo", "train.per_device_train_batch_size=1", "train.max_length=64")
    peak = estimates.predict(shapes.shape_of(spec)).peak_mb
    spec.hardware.memory_gb = peak * ratio / 1024
    if outcome is None:
        with pytest.raises(errors.TooBig):
            preflight.preflight(spec)
    else:
        assert any(line.startswith(outcome) for line in preflight.preflight(spec).lines)


def test_a_reward_model_gets_no_prediction_and_cannot_ask_for_an_automatic_micro_batch():
    assert preflight.preflight(built("recipes=tiny_reward_model")) == preflight.Verdict(None, [])
    cfg, _ = config.compose(["recipes=tiny_reward_model", "hardware.micro_batch=auto"])
    assert any("memory is predicted for DPO runs only" in p for p in rules.problems(views.read(cfg)))


@pytest.mark.slow
def test_the_docs_table_is_the_tools_output():
    """Made by `python -m dpo_recipes.memory.cards`; regenerate it there when a recipe or the model changes."""
    page = (ROOT / "docs" / "memory.md").read_text()
    assert cards.table(cards.shipped_gpu_recipes()) in page


# What DeepSpeed's estimator calls model states: weights, gradients, fp32 masters and optimizer states,
# and ZeRO-3's gathered layer
MODEL_STATES = ("policy weights", "gradients", "master weights (fp32)", "optimizer states", "gathered layers")
QWEN7B_PARAMS, QWEN7B_EMBEDDING = 7_615_616_512, 152_064 * 3_584  # the published count; the largest module


@pytest.mark.parametrize("gpus", [2, 4, 8])
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_model_states_are_deepspeeds_own_estimate(stage, gpus):
    """DeepSpeed's estimator functions (run on CPU) for Qwen2.5-7B: ZeRO-2 keeps the bf16 weights whole
    and shards 18 bytes a parameter (2 + 18/N), ZeRO-3 shards all 18 and adds 4 bytes per weight of the
    largest module; ours within 5%."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = shapes.shape_of(built("recipes=qwen7b_full_dpo", f"hardware=zero{stage}"), processes=gpus)
    counts = estimates._counts(shape)
    assert (counts.weights, counts.largest) == (QWEN7B_PARAMS, QWEN7B_EMBEDDING)
    if stage == 3:
        _, expected, _ = estimate_zero3_model_states_mem_needs(
            QWEN7B_PARAMS, QWEN7B_EMBEDDING, num_gpus_per_node=gpus, cpu_offload=False
        )
    else:
        _, expected = estimate_zero2_model_states_mem_needs(
            QWEN7B_PARAMS, num_gpus_per_node=gpus, cpu_offload=False
        )
    parts = estimates.predict(shape).parts
    ours = sum(parts.get(name, 0) for name in MODEL_STATES) * trace.MB
    assert ours == pytest.approx(expected, rel=0.05)
    assert ("reference weights" in parts) and parts["reference weights"] * trace.MB == pytest.approx(
        2 * QWEN7B_PARAMS / (gpus if stage == 3 else 1), rel=0.01
    )  # bf16, sharded under ZeRO-3 only


def test_fsdp_counts_its_own_checkpointing_and_accelerates_fp32_upcast():
    spec = built("recipes=qwen7b_full_dpo", "hardware=fsdp")
    shape = shapes.shape_of(spec)
    assert not spec.args.activation_checkpointing and shape.checkpointing  # accelerate/fsdp.yaml's
    assert shape.processes == 8  # the accelerate config's, where no launch says otherwise
    parts = estimates.predict(shape).parts
    assert parts["policy weights"] * trace.MB == pytest.approx(4 * QWEN7B_PARAMS / 8, rel=0.01)
    assert parts["optimizer states"] * trace.MB == pytest.approx(8 * QWEN7B_PARAMS / 8, rel=0.01)


def test_one_gpu_full_fine_tuning_is_planned_with_fp32_weights_under_bf16_autocast():
    shape = shapes.shape_of(built("recipes=qwen7b_full_dpo", "hardware=gpu"))
    assert (shape.dtype, shape.mixed) == (torch.float32, torch.bfloat16)
    parts = estimates.predict(shape).parts
    assert parts["policy weights"] * trace.MB == pytest.approx(4 * QWEN7B_PARAMS, rel=0.01)
    assert parts["optimizer states"] * trace.MB == pytest.approx(8 * QWEN7B_PARAMS, rel=0.01)


QWEN3_8B_REWARD = (
    151_936 * 4_096
    + 36 * (2 * 4_096 * 4_096 + 2 * 4_096 * 1_024 + 3 * 4_096 * 12_288 + 2 * 4_096 + 2 * 128)
    + 4_096
    + 4_096
)  # embedding, 36 layers (attention, MLP, two norms, q/k norms), the final norm, the score


def test_judging_while_training_counts_the_judge_and_its_generation_cache():
    """judge.every loads the judge onto the training GPU at the first judged evaluation and keeps it; the
    policy generates a batch of answers with its KV cache."""
    plain = estimates.predict(shapes.shape_of(built("recipes=qwen7b_lora_dpo")))
    spec = built("recipes=qwen7b_lora_dpo", "judge=skywork_v2_qwen3_8b", "judge.every=200")
    judged = estimates.predict(shapes.shape_of(spec))
    assert judged.parts["judge weights (judge.every)"] * trace.MB == 2 * QWEN3_8B_REWARD  # bf16, as saved
    tokens = min(spec.judge.prompts, 16) * (2048 + spec.judge.max_new_tokens)
    cache = tokens * 28 * 2 * 4 * 128 * 2  # layers, key and value, kv heads, head size, bf16
    assert judged.parts["generation cache (judge.every)"] * trace.MB == pytest.approx(cache)
    assert judged.peak_mb > plain.peak_mb + (2 * QWEN3_8B_REWARD + cache) / trace.MB


@pytest.mark.slow
def test_eager_attention_under_the_layouts_is_counted_as_the_longer_rows_it_attends(long_rows, tmp_path):
    """A packed row under eager attention holds its whole score matrix: more than the padded batch's
    (measured 1.5x); the prediction traces the layout's rows and stays above the measured peak."""
    eager = [
        "recipes=tiny_lora_dpo",
        "train.per_device_train_batch_size=4",
        "model.attn_implementation=eager",
    ]
    padded = estimates.predict(shapes.shape_of(built(*eager, *LAYOUT["padded"], "train.max_length=64")))
    predicted, peak = measured(tmp_path, long_rows, eager)  # as the recipe ships: both layouts
    assert predicted > padded.peak_mb and peak <= predicted <= 1.5 * peak, (predicted, peak, padded.peak_mb)
