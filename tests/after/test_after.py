"""After training: `samples` shows what DPO changed in the answers, `export` writes a standalone model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run, tiny_overrides

from dpo_recipes import ROOT
from dpo_recipes.after import export, samples, trained

# The proof: how often each model answers the first 64 eval prompts in the asked-for mood (greedy, as
# `make samples N=64`), and the final eval accuracy, for the run as it ships. Its bounds come from the
# spread (`python -m benchmarks spread`, BENCHMARKS.md: 3 instruction sets, 1 and 2 threads, 5 seeds of
# the base and the run). The run as it ships (seed 0) in every cell: the policy in the asked mood for
# 94-100% of the prompts, the reference for 48-50%, the policy ahead by +0.45 to +0.52, eval accuracy
# 0.96-1.00. Greedy rates rest on one answer per mood (the tiny model writes the same remark whatever the
# topic), so they jump: another base, seed 3, answers in the asked mood for 42-44% against its
# reference's 48%, at eval accuracy 0.98-0.99. So the policy is only asserted ahead of the reference;
# eval accuracy, the steady measure (0.96-1.00 in all 13 cells), is asserted well clear of chance.
BOUNDS = {"policy": 0.45, "reference": (0.25, 0.85), "margin": 0.0, "accuracy": 0.9}


def proof(rates: dict, accuracy: float) -> list[str]:
    """What fails of the learning proof, for a run's greedy mood rates and its final eval accuracy."""
    low, high = BOUNDS["reference"]
    margin = rates["policy"] - rates["reference"]
    checks = {
        f"policy {rates['policy']:.2f} < {BOUNDS['policy']:.2f}": rates["policy"] >= BOUNDS["policy"],
        f"reference {rates['reference']:.2f} outside {low:.2f}-{high:.2f}": low <= rates["reference"] <= high,
        f"margin {margin:.2f} <= {BOUNDS['margin']:.2f}": margin > BOUNDS["margin"],
        f"eval accuracy {accuracy:.2f} < {BOUNDS['accuracy']:.2f}": accuracy >= BOUNDS["accuracy"],
    }
    return [what for what, ok in checks.items() if not ok]


def copy_of(run_dir, dest, edit, *leave_out):
    """A copy of a run with its summary changed by `edit`, without its export and samples."""
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("export", "samples.*", *leave_out))
    path = dest / "dpo_metrics/summary.json"
    summary = json.loads(path.read_text())
    edit(summary)
    path.write_text(json.dumps(summary))
    return dest


@pytest.fixture(scope="module")
def sampled(default_run):
    _, metrics = default_run
    assert samples.main([str(metrics.parent), "--n", "64"]) == 0
    rows = [json.loads(line) for line in (metrics / "samples.jsonl").read_text().splitlines()]
    return rows, (metrics / "samples.md").read_text()


@pytest.mark.e2e
def test_the_policy_answers_in_the_asked_mood_where_the_reference_does_not(sampled, default_run):
    rows, page = sampled
    assert len(rows) == 64
    eval_rows = [json.loads(line) for line in (ROOT / "data/toy/eval.jsonl").read_text().splitlines()]
    words = samples.mood_words(eval_rows)
    assert words["cheerful"] >= {"wonderful", "love", "delight"} and words["gloomy"] >= {
        "dull",
        "dread",
        "burden",
    }
    greedy = samples.mood_rates(rows, words)
    assert f"reference {greedy['reference']:.0%}, policy {greedy['policy']:.0%}" in page
    # The reference writes remarks in either mood, not noise: nearly every answer has one.
    assert sum(samples.mood_of(r["reference"]["text"], words) is not None for r in rows) >= 0.9 * len(rows)
    trainer, _ = default_run
    accuracy = [e["eval_rewards/accuracies"] for e in trainer.state.log_history if "eval_loss" in e][-1]
    assert proof(greedy, accuracy) == []


@pytest.mark.e2e
def test_the_proof_holds_on_avx2_kernels():
    """The default run on a machine without AVX-512: ATen, oneDNN and MKL capped at AVX2 in a fresh
    process, which builds its own tiny base, trains and samples 64 prompts."""
    from benchmarks import spread

    cell = spread.cell("avx2", 2, 0)
    assert proof(cell, cell["eval_accuracy"]) == []


@pytest.mark.e2e
def test_samples_md_sets_the_answers_side_by_side_with_their_rewards(sampled, default_run):
    rows, page = sampled
    table = [line for line in page.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 64
    first = rows[0]
    assert samples.cell(first["policy"]["text"]) in table[0] and samples.cell(first["chosen"]) in table[0]
    # The policy's own answers are the ones it now prefers over the reference: positive implicit reward.
    mean = {
        name: sum(r[name]["implicit_reward"] for r in rows) / len(rows) for name in ("reference", "policy")
    }
    assert mean["policy"] > max(0.0, mean["reference"])


@pytest.mark.e2e
def test_answers_generated_in_batches_are_the_ones_generated_one_at_a_time(default_run):
    """`make samples` generates 16 prompts at a time, padded on the left: greedy, each answer's ids equal
    those of its prompt generated alone (the path batching replaced), up to and with its stop token or
    to the token limit."""
    from transformers import AutoTokenizer

    _, metrics = default_run
    run = trained.open_run(metrics.parent)
    tokenizer, policy = AutoTokenizer.from_pretrained(run.weights), trained.policy(run)
    prompts = [row["prompt"] for row in samples.prompts(run, None)[:8]]
    options = SimpleNamespace(temperature=0.0, max_new_tokens=48, seed=0, batch_size=8)
    decoding = samples.decoding_of(tokenizer, policy, options)
    together = samples.batched(policy, tokenizer, prompts, options, decoding, "cpu", "batched")
    one = SimpleNamespace(**{**vars(options), "batch_size": 1})
    alone = samples.batched(policy, tokenizer, prompts, one, decoding, "cpu", "alone")
    stops = (
        decoding["eos_token_id"] if isinstance(decoding["eos_token_id"], list) else [decoding["eos_token_id"]]
    )
    assert together == alone and all(ids[-1] in stops or len(ids) == 48 for ids in alone)
    assert any(ids[-1] in stops for ids in alone)  # cut after the stop token, the padding after it left out


@pytest.mark.e2e
def test_an_implicit_reward_is_beta_times_the_log_ratio(sampled, default_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, metrics = default_run
    rows, _ = sampled
    run_dir = metrics.parent
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    base_path = trainer.model.peft_config["default"].base_model_name_or_path
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), run_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(base_path).eval()
    row = rows[0]
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
    answer = tokenizer(row["policy"]["text"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    logps = [samples.completion_logp(m, prompt, answer, "cpu") for m in (policy, reference)]
    beta = trainer.args.beta
    assert row["policy"]["implicit_reward"] == pytest.approx(beta * (logps[0] - logps[1]), abs=1e-3)


@pytest.mark.e2e
def test_export_merges_the_adapter_into_a_model_that_loads_without_peft(default_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, metrics = default_run
    out = tmp_path / "export"
    assert export.main([str(metrics.parent), "--out", str(out), "--max-shard-size", "4MB"]) == 0
    assert not (out / "adapter_config.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32  # the base's dtype
    base_path = trainer.model.peft_config["default"].base_model_name_or_path
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path), metrics.parent
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me something cheerful about a glacier."}],
        add_generation_prompt=True,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(metrics.parent).chat_template
    card = (out / "README.md").read_text()
    summary = json.loads((metrics / "summary.json").read_text())
    for expected in (
        "tiny_lora_dpo",
        f"Base model: `{Path(base_path).name}`",
        "1000 read, 1000 kept by conversion, 1000 kept by TRL",
        f"{summary['final']['eval_rewards/accuracies']:.4g}",
        "make train RECIPE=tiny_lora_dpo",
        "training_curves.png",
    ):
        assert expected in card
    assert (out / "training_curves.png").exists()
    for name in ("README.md", "config.json", "generation_config.json"):  # no path of this machine
        assert not export.ABSOLUTE.search((out / name).read_text()), name


@pytest.mark.e2e
def test_an_export_is_never_overwritten(default_run, tmp_path, capsys):
    _, metrics = default_run
    out = tmp_path / "export"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert export.main([str(metrics.parent), "--out", str(out)]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert not list(tmp_path.glob(".exporting-*"))


@pytest.mark.e2e
def test_an_unfinished_run_is_refused_unless_forced(default_run, tmp_path, capsys):
    _, metrics = default_run
    stopped = copy_of(metrics.parent, tmp_path / "stopped", lambda s: s.update(status="interrupted"))
    for module in (export, samples):
        assert module.main([str(stopped)]) == 2
        assert "'interrupted', not finished" in capsys.readouterr().err
    assert not (stopped / "export").exists() and not (stopped / "dpo_metrics/samples.md").exists()
    assert export.main([str(stopped), "--force"]) == 0
    assert f"using {stopped / 'checkpoint-150'}" in capsys.readouterr().out
    assert (stopped / "export" / "model.safetensors").exists()


@pytest.mark.e2e
def test_a_full_run_exports_as_is_and_samples_against_its_base(tmp_path, capsys):
    _, metrics = run(tmp_path, tiny_overrides("tiny_full_dpo"))
    run_dir = metrics.parent
    asked = tmp_path / "prompts.txt"
    asked.write_text("Tell me something cheerful about a kettle.\n\nDescribe a pond in a gloomy way.\n")
    options = ["--prompts", str(asked), "--temperature", "0.7", "--max-new-tokens", "8"]
    assert samples.main([str(run_dir), *options]) == 0
    rows = [json.loads(line) for line in (metrics / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"][0]["content"] for r in rows] == asked.read_text().split("\n")[::2][:2]
    assert all(r["reference"]["text"] and r["policy"]["text"] and r["chosen"] is None for r in rows)
    assert "2 prompts, temperature 0.7, seed 0" in (metrics / "samples.md").read_text()
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text((ROOT / "data/toy/eval.jsonl").read_text().splitlines()[0] + "\n")
    assert samples.main([str(run_dir), "--prompts", str(rows_file), "--max-new-tokens", "8"]) == 0
    (row,) = [json.loads(line) for line in (metrics / "samples.jsonl").read_text().splitlines()]
    assert row["chosen"] == json.loads(rows_file.read_text())["chosen"]
    rows_file.write_text('{"question": "hi"}\n')
    assert samples.main([str(run_dir), "--prompts", str(rows_file)]) == 2
    assert "no 'prompt' column (has ['question'])" in capsys.readouterr().err
    assert export.main([str(run_dir)]) == 0
    copied = run_dir / "export"
    assert (copied / "model.safetensors").read_bytes() == (run_dir / "model.safetensors").read_bytes()
    assert not (copied / "training_args.bin").exists() and (copied / "tokenizer.json").exists()


@pytest.mark.e2e
def test_push_without_the_hub_says_so_and_keeps_the_export(default_run, tmp_path):
    _, metrics = default_run
    out = tmp_path / "export"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpo_recipes.after.export",
            str(metrics.parent),
            "--out",
            str(out),
            "--push-to-hub",
            "me/tiny",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 1, done.stderr
    assert "not pushed to me/tiny" in done.stderr and "hf upload me/tiny" in done.stderr
    assert "Traceback" not in done.stderr
    assert (out / "README.md").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["samples", "export"])
def test_make_targets_take_the_run_and_say_how_without_one(target):
    cmd = ["make", "--no-print-directory", "-n", target, "RUN=outputs/r/t", "N=3", "ARGS=--force"]
    line = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.splitlines()[-1]
    assert line.endswith(
        f"-m dpo_recipes.after.{target} 'outputs/r/t'"
        + (" --n 3" if target == "samples" else "")
        + " --force"
    )
    missing = subprocess.run(
        ["make", "--no-print-directory", target], capture_output=True, text=True, cwd=ROOT
    )
    assert missing.returncode == 2 and f"usage: make {target} RUN=" in missing.stdout


def test_a_run_is_found_by_its_name_under_outputs(tmp_path, monkeypatch):
    from dpo_recipes import errors
    from dpo_recipes.after import trained

    monkeypatch.chdir(tmp_path)  # outputs/ of the directory train ran in
    metrics = tmp_path / "outputs" / "tiny_lora_dpo" / "mine" / "dpo_metrics"
    metrics.mkdir(parents=True)
    (metrics / "summary.json").write_text(json.dumps({"status": "finished"}))
    assert trained.open_run("mine").dir.resolve() == metrics.parent
    with pytest.raises(errors.RunError, match="theirs: no dpo_metrics/summary.json"):
        trained.open_run("theirs")


@pytest.mark.e2e
def test_a_qlora_run_is_merged_into_the_base_in_bf16(default_run, tmp_path, capsys):
    from safetensors.torch import load_file

    _, metrics = default_run
    # As the QLoRA recipe trains: a 4-bit base with bf16 compute.
    qlora = copy_of(
        metrics.parent,
        tmp_path / "qlora",
        lambda s: s["config"]["model"].update(load_in_4bit=True),
        "checkpoint-*",
    )
    assert export.main([str(qlora)]) == 0
    assert "merged into the base loaded in bf16 (not into its quantized weights)" in capsys.readouterr().out
    weights = load_file(qlora / "export" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
