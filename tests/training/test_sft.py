"""Supervised fine-tuning as a task (`task: sft`, TRL's SFTTrainer) on the chosen answers of preference
data, through the same groups as DPO; and DPO after it, from its adapter and against it."""

import json

import pytest
import torch
from conftest import python_m, run
from safetensors.torch import load_file
from trl import SFTTrainer

from dpo_recipes import config, errors
from dpo_recipes.training import chat, data

SHORT = ["dataset.max_samples=32", "dataset.max_eval_samples=8", "++train.logging_steps=1"]


def test_completions_pair_each_prompt_with_its_chosen_answer():
    from datasets import Dataset

    pairs = Dataset.from_list([{"prompt": "p", "chosen": "good", "rejected": "bad"}])
    assert data.completions(pairs).to_list() == [{"prompt": "p", "completion": "good"}]
    assert data.completions(None) is None


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["loss=ipo"], "loss=ipo: task=sft fine-tunes on the chosen answers"),
        (["train.beta=0.1"], "train.beta: not a SFTConfig field"),
        (["reference=copy"], "reference=copy: task=sft fine-tunes on the chosen answers (TRL's SFTTrainer"),
        (["model.load_in_4bit=true"], "model.load_in_4bit: task=sft trains LoRA on bf16 weights"),
        (["judge.every=10"], "judge.every: judges a DPO policy against its reference; with task=sft"),
    ],
)
def test_an_sft_recipe_reads_train_as_sftconfig_and_refuses_dpo_options(overrides, words, tmp_path):
    built = config.build(config.compose(["recipes=tiny_sft"])[0], tmp_path)
    assert built.task == "sft" and type(built.args).__name__ == "SFTConfig"
    with pytest.raises(errors.ConfigError) as err:
        config.check(config.compose(["recipes=tiny_sft", *overrides])[0])
    assert words in str(err.value), err.value


@pytest.mark.slow
def test_sft_logs_trls_own_losses_on_the_same_rows(tmp_path):
    """The recipe's run and TRL's SFTTrainer given the same rows (each prompt with its chosen answer),
    config and LoRA: the same loss at each of 3 steps, within 1e-5."""
    overrides = ["recipes=tiny_sft", *SHORT, "++train.max_steps=3", "++train.eval_strategy=no"]
    trainer, metrics = run(tmp_path, overrides)
    ours = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    built = config.build(config.compose(overrides)[0], tmp_path / "trl")
    train_set, _, _ = data.load(built.dataset, built.args.seed, built.args.dataset_num_proc)
    tokenizer = chat.tokenizer(built)
    trl = SFTTrainer(
        model=built.model.model_name_or_path,
        args=built.args,
        train_dataset=data.completions(train_set),
        processing_class=tokenizer,
        peft_config=built.peft,
    )
    trl.train()
    theirs = [e["loss"] for e in trl.state.log_history if "loss" in e]
    assert len(ours) == len(theirs) == 3
    assert ours == pytest.approx(theirs, abs=1e-5)
    header = (metrics / "training_metrics.csv").read_text().splitlines()[0]
    assert "mean_token_accuracy" in header


@pytest.mark.slow
def test_dpo_after_sft_starts_from_its_adapter_and_holds_it_as_the_reference(tmp_path):
    """The two-stage pipeline the SFT verdict prints: DPO with reference=sft_adapter at the SFT run dir
    starts where SFT ended (at its first step the policy's rewards are 0: policy and reference are the
    same adapter) and keeps that adapter frozen as the reference. `make export` merges the SFT model
    alone, its card naming SFT."""
    sft, sft_metrics = run(tmp_path / "sft", ["recipes=tiny_sft", *SHORT, "++train.max_steps=4"])
    sft_dir = sft_metrics.parent
    summary = json.loads((sft_metrics / "summary.json").read_text())
    assert summary["task"] == "sft" and summary["status"] == "finished"
    assert f"reference=sft_adapter reference.path={sft_dir}" in (sft_metrics / "summary.md").read_text()
    exported = python_m("dpo_recipes.after.export", str(sft_dir), "--out", str(tmp_path / "sft_export"))
    assert exported.returncode == 0, exported.stderr  # make export: the SFT model alone, merged
    card = (tmp_path / "sft_export" / "README.md").read_text()
    assert "trained with SFT" in card and "no reference model" in card, card
    dpo, _ = run(
        tmp_path / "dpo",
        [
            "recipes=tiny_lora_dpo",
            "reference=sft_adapter",
            f"reference.path={sft_dir}",
            *SHORT,
            "++train.max_steps=2",
        ],
    )
    first = next(e for e in dpo.state.log_history if "loss" in e)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5) and first[
        "rewards/margins"
    ] == pytest.approx(0, abs=1e-5)
    saved = load_file(sft_dir / "adapter_model.safetensors")
    reference = {n: p for n, p in dpo.model.named_parameters() if ".ref." in n}
    assert reference and not any(p.requires_grad for p in reference.values())
    for name, weight in saved.items():
        held = reference[name.replace(".weight", ".ref.weight")]
        assert torch.equal(held.detach().cpu(), weight), name


@pytest.mark.slow
def test_sft_trains_on_plain_instruction_data(tmp_path):
    """Alpaca-style rows with one `output` each (format instruction), as most SFT data comes: every row
    is trained on, its answer as the completion."""
    rows = [
        {"instruction": f"Write a cheerful sentence on topic {i}.", "output": f"Topic {i} is a delight!"}
        for i in range(24)
    ]
    path = tmp_path / "instructions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data_args = [f"dataset.path={path}", "dataset.format=instruction", "dataset.eval_path=null"]
    trainer, metrics = run(
        tmp_path, ["recipes=tiny_sft", *data_args, "++train.max_steps=2", "++train.logging_steps=1"]
    )
    counts = json.loads((metrics / "summary.json").read_text())["dataset"]["train"]
    assert counts["rows_kept_by_conversion"] == counts["rows_kept_by_trl"] == 24
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2]


@pytest.mark.slow
def test_dpo_after_sft_as_shipped_beats_the_sft_model_on_the_judge(tmp_path):
    """`make train RECIPE=tiny_sft`, then the default recipe from its adapter (reference=sft_adapter),
    then `make eval` on it: the tiny judge prefers its greedy answers to its reference's (the SFT model)
    on 64 held-out prompts, the 95% interval above 1/2 (0.76, 0.66-0.84 on an AVX-512 CPU; 0.74,
    0.64-0.82 with the kernels capped at AVX2). Against the same recipe trained from the base it wins on
    the AVX-512 CPU at train.seed 42 but ties at seeds 1 and 2 (BENCHMARKS.md, Methods, the sft_then_dpo
    rows) and with the kernels capped at AVX2 (0.52, 0.44-0.61): DPO from the base already answers in the
    asked mood, so that is not asserted."""
    _, sft = run(tmp_path / "sft", ["recipes=tiny_sft", "++train.disable_tqdm=true"])
    _, metrics = run(
        tmp_path, ["reference=sft_adapter", f"reference.path={sft.parent}", "++train.disable_tqdm=true"]
    )
    done = python_m("dpo_recipes.after.evaluate", str(metrics.parent), "--n", "64", "--max-new-tokens", "48")
    assert done.returncode == 0, done.stderr
    versus = json.loads((metrics / "eval.json").read_text())["comparisons"]["policy_vs_reference"]
    assert versus["n"] == 64 and versus["interval"][0] > 0.5, versus
