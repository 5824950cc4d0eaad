"""The fast tokenization path gives exactly TRL's token ids, and falls back where it cannot."""

from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from data_prep.pipeline import Options, convert, read
from dpo_recipes import ROOT, tiny, tokenize

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny.path())


def trl_path(dataset, tokenizer, max_length=256):
    args = DPOConfig("unused", use_cpu=True, bf16=False, max_length=max_length, report_to="none")
    host = type("Host", (), {"_tokenizer": tokenizer})()
    return DPOTrainer._prepare_dataset(host, dataset, tokenizer, args, "train")


def assert_same_ids(dataset, tokenizer, max_length=256):
    theirs = trl_path(dataset, tokenizer, max_length)
    ours = tokenize.prepare(dataset, tokenizer, max_length, "keep_start", None, "train")
    assert len(ours) == len(theirs) > 0
    for column in COLUMNS:
        assert ours[column] == theirs[column], column


def test_same_ids_as_trl_on_the_toy_data(tokenizer):
    dataset, _ = convert(read(str(ROOT / "data" / "toy" / "train.jsonl")), Options("trl"))
    assert tokenize.eligible(dataset, tokenizer)
    assert_same_ids(dataset, tokenizer)


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real is absent")
@pytest.mark.parametrize("max_length", [256, 4096])
def test_same_ids_as_trl_on_the_real_data(tokenizer, max_length):
    dataset, _ = convert(read(str(REAL / "dpo_en_demo.sharegpt.json")), Options("sharegpt"))
    assert_same_ids(dataset, tokenizer, max_length)  # 256 also drops the same too-long prompts


def test_completion_whitespace_at_the_boundary_is_split_like_trl(tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": "\n\n no"}],
        }
        for c in ("\n\nyes", " yes", "yes\n", "\t x")
    ]
    assert_same_ids(Dataset.from_list(rows), tokenizer)


def test_a_template_that_is_not_prefix_stable_falls_back(tokenizer):
    unstable = tokenizer.__class__.from_pretrained(tiny.path())
    unstable.chat_template = (  # like DeepSeek-R1: the generation prompt opens a think block the answer lacks
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    rows = [
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "No"}],
        }
    ]
    with pytest.raises(tokenize.NotPrefixStable):
        tokenize.prepare(Dataset.from_list(rows), unstable, 256, "keep_start", None, "train")


@pytest.mark.slow
def test_training_reports_which_path_tokenized(tmp_path):
    from conftest import tiny_overrides

    from dpo_recipes import config, train

    cfg, recipe = config.compose(tiny_overrides("tiny_lora_dpo"))
    trainer = train.run(cfg, tmp_path / "run", recipe)
    assert trainer.tokenize_log["train"]["path"] == "fast"
