"""Benchmark scripts run (the GPU one at the tiny Qwen's shape on CPU), so they cannot rot unnoticed."""

import importlib.util
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks import gpu
from dpo_recipes.sources import tiny


@pytest.mark.slow
def test_flop_count_takes_every_weight_that_multiplies_activations():
    model = AutoModelForCausalLM.from_pretrained(tiny.qwen_path())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert gpu.flops_per_token(tiny.QWEN, seq=0) == 2 * linear
    # Qwen2.5-7B: 6.53B non-embedding parameters (its model card) plus the untied 545M-parameter LM head
    assert gpu.flops_per_token({**tiny.QWEN, **gpu.QWEN2_5_7B}, seq=0) / 2 == pytest.approx(7.07e9, rel=0.01)


@pytest.mark.parametrize("flash", [False, True], ids=["no flash-attn", "flash-attn"])
def test_each_gpu_layout_runs_under_an_attention_its_rule_allows(flash, monkeypatch):
    from dpo_recipes.config import rules

    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: (flash or None) if name == "flash_attn" else found(name)
    )
    for flags, allowed in ((["padding_free"], rules.PACKABLE), (["share_prompt"], rules.SHAREABLE)):
        for device in ("cuda", "cpu"):
            *_, attention = gpu.layout(device, *flags)
            assert attention.split("=")[1] in allowed, (flags, device)
    *_, attention = gpu.layout("cuda", "padding_free")
    assert attention.endswith("flash_attention_2" if flash else "sdpa")
    assert gpu.layout("cuda", "padding_free", "share_prompt")[-1].endswith("sdpa")
    assert gpu.layout("cpu", "padding_free")[-1].endswith("sdpa")


@pytest.mark.slow
def test_bench_gpu_runs_at_the_tiny_shape_on_cpu(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shipped, plain, packed = "make train, as shipped", "plain TRL script", "train.padding_free=true"
    result = gpu.run(tiny_shape=True, steps=2, accumulation=2, only=(shipped, plain, packed))
    assert list(tmp_path.iterdir()) == []  # the model and the runs go with the bench, 15 GB at 7B
    rows = {r["what"]: r for r in result["results"]}
    assert set(rows) == {shipped, plain, packed}
    for row in rows.values():
        assert row["first_loss"] == pytest.approx(math.log(2), abs=0.01)
        assert row["tokens_per_s"] > 0 and row["step_s"] > 0
    # the same settings, the same first step
    assert rows[shipped]["first_loss"] == rows[plain]["first_loss"]
    assert rows[packed]["first_loss"] == pytest.approx(rows[plain]["first_loss"], rel=1e-5)
    assert "| make train, as shipped | sdpa | 1 |" in gpu.table(result)
    # each of our runs brings its own memory prediction, to stand beside the GPU's measured peak
    assert rows[shipped]["predicted_gb"] is not None and rows[plain]["predicted_gb"] is None


@pytest.mark.slow
def test_the_gpu_memory_check_runs_at_the_tiny_shape_on_cpu(tmp_path, monkeypatch):
    import tempfile

    from benchmarks import gpu_memory

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = gpu_memory.run(tiny_shape=True)
    assert [r["what"] for r in result["results"]] == list(gpu_memory.RUNS)
    for row in result["results"]:  # no CUDA counter here: the prediction alone, the run trained
        assert row["predicted_gb"] > 0 and row["measured_gb"] is None
        assert row["first_loss"] == pytest.approx(math.log(2), abs=0.01)
    assert "| full, fp32 masters (qwen7b_full_dpo, hardware=gpu) |" in gpu_memory.table(result)


def test_a_partial_bench_keeps_each_sections_own_machine_and_date(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    import benchmarks.__main__ as bench

    fake = SimpleNamespace(run=lambda: {"value": 2}, table=lambda result: f"value {result['value']}")
    monkeypatch.setattr(bench, "BENCHMARKS", {"old": ("Old", fake), "new": ("New", fake)})
    (tmp_path / "benchmarks").mkdir()
    old = {"value": 1, "machine": {"date": "2020-01-01", "cpu": "elsewhere"}}
    (tmp_path / "benchmarks" / "results.json").write_text(json.dumps({"old": old}))
    bench.main(["new"], root=tmp_path)
    text = (tmp_path / "BENCHMARKS.md").read_text()
    old_section, new_section = text.split("## Old")[1].split("## New")
    assert "date 2020-01-01, cpu elsewhere" in old_section and "value 1" in old_section
    assert f"date {bench.machine()['date']}" in new_section and "value 2" in new_section


@pytest.mark.slow
def test_the_plain_trl_baseline_trains_what_the_default_recipe_does(tmp_path):
    from benchmarks import plain_trl
    from dpo_recipes import config

    cfg, recipe = config.compose(["recipes=tiny_lora_dpo"])
    built = config.build(cfg, tmp_path, recipe, machine=False)
    settings = plain_trl.RECIPES["tiny_lora_dpo"]
    for key, value in settings["train"].items():
        if key not in ("disable_tqdm", "model_init_kwargs"):
            assert getattr(built.args, key) == value, key
    assert {k: getattr(built.peft, k) for k in settings["lora"]} == settings["lora"]


@pytest.mark.slow
def test_the_eval_bench_times_both_ways_on_the_same_answers(monkeypatch):
    from benchmarks import evaluation

    monkeypatch.setattr(evaluation, "PROMPTS", 8)
    result = evaluation.run(repeats=1)
    assert result["same_answers"] and result["prompts"] == 8
    assert set(result["prompts_per_s"]) == set(evaluation.BATCHES)
    assert "| batched (16) |" in evaluation.table(result)


def test_the_step_table_says_which_goal_was_met_and_by_how_much_one_was_missed():
    from benchmarks import step

    def row(case, way, step_ratio, wall_ratio=1.0):
        values = dict(step_s=1.0, tokens_per_step=10, train_s=1.0, wall_s=1.0, peak_rss_mb=1)
        return {
            "case": case,
            "way": step.WAYS[way][0],
            **values,
            "step_ratio": step_ratio,
            "wall_ratio": wall_ratio,
        }

    micro_batch_1 = "tiny Llama, real rows, micro-batch 1"
    rows = [row(micro_batch_1, "shared", 0.861), row(step.QWEN, "ours", 0.117, wall_ratio=0.249)]
    text = step.table({"rows": rows, "repeats": 2})
    assert "CPU head + share_prompt, step <= 0.85x TRL's: 0.861, missed by 0.011." in text
    assert "CPU head, step <= 0.35x TRL's: 0.117, met." in text
    assert "process wall time (3x faster) <= 0.333x TRL's: 0.249, met." in text
    assert "micro-batch 4" not in text  # a goal whose row was not measured is not judged


def test_the_suite_benchmark_reads_pytests_counts_without_its_timing():
    from benchmarks import suite

    out = "....\n===== 388 passed, 245 deselected, 63 warnings in 144.53s (0:02:24) =====\n"
    assert suite.counts(out) == "388 passed, 245 deselected, 63 warnings"
    assert suite.counts("== 2 failed, 3 passed in 1.00s ==") == "2 failed, 3 passed"
    row = {"what": "make test-fast", "wall_s": 150, "exit": 0, "tests": "388 passed"}
    assert "| `make test-fast` | 150 | 0 | 388 passed |" in suite.table({"commit": "abc", "results": [row]})
    failed = {**row, "exit": 1, "failed": ["tests/a.py::test_b[x]"]}
    assert "failed in `make test-fast`: tests/a.py::test_b[x]" in suite.table(
        {"commit": "abc", "results": [failed]}
    )


def test_the_rounds_table_has_a_row_a_round_of_each_run():
    from benchmarks import rounds

    def compared(rate):
        return {"win_rate": rate, "interval": [rate - 0.1, rate + 0.05], "length_ratio": 1.02}

    row = {
        "round": 1,
        "vs_start": compared(0.7),
        "vs_previous": compared(0.6),
        "sampled": {"pairs": 500, "prompts": 512},
        "seconds": {"sampling": 3.0, "judging": 1.0, "training": 30.0, "eval": 2.0},
    }
    table = rounds.table({"runs": {"fresh, seed 42": [row, {**row, "round": 2}], "cached, seed 1": [row]}})
    assert (
        "| fresh, seed 42 | 2 | 0.70 (0.60-0.75) | 0.60 (0.50-0.65) | 1.02 | 500 of 512 | 3.0 | 1.0 | 30.0 | 2.0 |"
        in table
    )
    assert table.count("\n| ") == 4  # the separator and three rounds


def test_the_methods_table_has_a_row_a_run_and_the_two_stage_rows_comparison():
    from benchmarks import methods

    def compared(rate, wins, ties, losses):
        return {
            "win_rate": rate,
            "interval": [rate - 0.12, rate + 0.1],
            "wins": wins,
            "ties": ties,
            "losses": losses,
        }

    row = {"recipe": "tiny_orpo", "seed": 42, "metric": "eval_rewards/accuracies", "value": 1.0, "s_per_step": 0.11,
           "predicted_mb": 45.3, "measured_mb": 42.7, "vs_base": compared(0.7, 40, 10, 14)}  # fmt: skip
    two = {**row, "recipe": "sft_then_dpo", "vs_dpo_from_base": compared(0.6, 30, 17, 17)}
    table = methods.table({"runs": [row, {**row, "measured_mb": None}, {**row, "predicted_mb": None}, two]})
    assert (
        "| tiny_orpo | 42 | eval_rewards/accuracies 1.0 | 0.11 | 45 / 43 (1.06) | 0.70 (0.58-0.80; 40-10-14) |"
        in table
    )
    assert "| not measured |" in table and "| not predicted |" in table
    assert (
        "over the SFT model: 0.70 (0.58-0.80; 40-10-14); over `tiny_lora_dpo` from the base: 0.60 (0.48-0.70"
        in table
    )


@pytest.mark.slow
def test_the_gpu_rounds_check_compares_the_engines_on_the_same_prompts(tmp_path, monkeypatch, vllm):
    """On CPU with vLLM's stand-in: both engines answer the same held-out and training prompts through
    rounds' own `answers`; the agreement is counted over the greedy answers."""
    import tempfile

    from benchmarks import gpu_rounds

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = gpu_rounds.run(prompts=4)
    assert list(result["engines"]) == ["transformers", "vllm"] and vllm.built["seed"] == 42
    for r in result["engines"].values():
        assert r["greedy"]["answers"] == 64 and (r["sampled"]["answers"], r["sampled"]["k"]) == (16, 4)
    assert 0 <= result["greedy_agreement"] < 1  # the stand-in answers the prompt's last tokens
    assert "| vllm | 64 |" in gpu_rounds.table(result)
