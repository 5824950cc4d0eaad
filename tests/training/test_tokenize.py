"""The fast tokenization path gives exactly TRL's token ids, and falls back where it cannot."""

import pytest
from datasets import Dataset
from tokenizers import AddedToken, pre_tokenizers
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from benchmarks.tokenization import THINK_TEMPLATE
from data_prep.pipeline import Options, convert
from data_prep.reading import read
from dpo_recipes import ROOT
from dpo_recipes.sources import assets, tiny
from dpo_recipes.training import tokenize

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
    assert ours.features == theirs.features
    for column in COLUMNS:
        assert ours[column] == theirs[column], column


def toy(rows=None):
    dataset, _ = convert(read(str(ROOT / "data" / "toy" / "train.jsonl")), Options("trl"))
    return dataset if rows is None else dataset.select(range(rows))


def fresh():
    return AutoTokenizer.from_pretrained(tiny.path())


def test_same_ids_as_trl_on_the_toy_data(tokenizer):
    dataset = toy()
    assert tokenize.eligible(dataset, tokenizer)
    assert_same_ids(dataset, tokenizer)


def test_same_ids_with_two_processes(tokenizer):
    dataset = toy(300)
    ours = tokenize.prepare(dataset, tokenizer, 256, "keep_start", 2, "train")
    theirs = trl_path(dataset, tokenizer)
    for column in COLUMNS:
        assert ours[column] == theirs[column], column


def test_prompts_are_cut_after_the_added_tokens_the_template_writes(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    assert tokenize.anchors(tokenizer) == {
        "<|im_start|>": ids("<|im_start|>"),
        "<|im_end|>": ids("<|im_end|>"),
    }


def test_tokens_that_take_whitespace_or_sit_inside_longer_ones_are_no_anchors():
    t = fresh()
    t.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<|sep|>", rstrip=True, normalized=False)]}
    )
    t.add_tokens([AddedToken("<|im_end|>\n", normalized=False)])
    t.chat_template = (  # <|sep|> takes the newline after it; cut there, the newline would be a token
        "{% for m in messages %}<|im_start|>{{ m['role'] }}<|sep|>\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant<|sep|>\n{% endif %}"
    )
    assert set(tokenize.anchors(t)) == {"<|im_start|>", "<|im_end|>\n"}
    assert_same_ids(toy(200), t)


def test_a_pre_tokenizer_that_marks_the_start_of_the_text_gets_no_cut():
    t = fresh()
    t.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    t.backend_tokenizer.model.unk_token = "<|pad|>"  # the mark at the start becomes a token
    assert tokenize.anchors(t) == {}
    assert_same_ids(toy(200), t)


def test_a_cut_whose_head_does_not_end_on_its_anchor_is_not_used(tokenizer, monkeypatch):
    # Cutting "assistant" after "assist" would tokenize "ant" apart; the per-row check catches it.
    assert tokenizer.tokenize("assistant") != tokenizer.tokenize("assist") + tokenizer.tokenize("ant")
    monkeypatch.setattr(
        tokenize, "anchors", lambda tokenizer: {"assist": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    )
    assert_same_ids(toy(50), tokenizer)


def test_a_tokenizer_with_preset_truncation_takes_trls_path():
    t = fresh()
    t.backend_tokenizer.enable_truncation(16)
    assert not tokenize.eligible(toy(10), t)


@pytest.fixture(scope="module")
def qwen():
    return AutoTokenizer.from_pretrained(tiny.qwen_path())


def real(layout="sharegpt"):
    name = {"sharegpt": "dpo_en_demo.sharegpt.json", "ultrafeedback": "dpo_en_demo.ultrafeedback.jsonl"}
    dataset, _ = convert(read(str(assets.unpacked(f"data/real/{name[layout]}"))), Options(layout))
    return dataset


@pytest.mark.parametrize("max_length", [256, 4096])
def test_same_ids_as_trl_on_the_real_data(tokenizer, max_length):
    assert_same_ids(real(), tokenizer, max_length)  # 256 also drops the same too-long prompts


@pytest.mark.parametrize("max_length", [256, 2048])
def test_same_ids_as_trl_on_the_real_data_with_qwens_tokenizer(qwen, max_length):
    dataset = real("ultrafeedback")
    assert tokenize.eligible(dataset, qwen) and "<|im_start|>" in tokenize.anchors(qwen)
    assert_same_ids(dataset, qwen, max_length)


def test_qwens_template_gives_rows_without_a_system_turn_its_default_one(qwen):
    default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert tokenize.template_system_prompt(qwen) == default
    assert tokenize.template_system_prompt(fresh()) is None  # the tiny Llama's template adds none
    dataset = real("ultrafeedback")
    bare = next(i for i, row in enumerate(dataset) if row["prompt"][0]["role"] != "system")
    ids = tokenize.prepare(dataset.select([bare]), qwen, 2048, "keep_start", None, "train")["prompt_ids"]
    assert qwen.decode(ids[0]).startswith(f"<|im_start|>system\n{default}<|im_end|>\n<|im_start|>user\n")


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


def unstable_template(tokenizer):
    """The generation prompt opens a think block unless the conversation has a system turn."""
    unstable = tokenizer.__class__.from_pretrained(tiny.path())
    unstable.chat_template = THINK_TEMPLATE
    return unstable


def test_rows_a_template_renders_unstably_are_tokenized_whole_in_place(tokenizer):
    unstable = unstable_template(tokenizer)
    rows = [
        {
            "prompt": ([{"role": "system", "content": "Be kind."}] if i % 3 else [])
            + [{"role": "user", "content": f"Hi {i}"}],
            "chosen": [{"role": "assistant", "content": f"Hello {i}"}],
            "rejected": [{"role": "assistant", "content": "No"}],
        }
        for i in range(12)
    ]
    dataset = Dataset.from_list(rows)
    assert_same_ids(dataset, unstable)  # stable and unstable rows mixed, in their order
    ours = tokenize.prepare(dataset, unstable, 256, "keep_start", None, "train")
    assert "<think>" not in unstable.decode(ours[0]["prompt_ids"])  # TRL's rule cuts where they diverge


@pytest.mark.slow
def test_training_reports_which_path_tokenized(tmp_path):
    from conftest import tiny_overrides

    from dpo_recipes import config, train

    cfg, recipe = config.compose(tiny_overrides("tiny_lora_dpo"))
    trainer = train.run(cfg, tmp_path / "run", recipe)
    assert trainer.tokenize_log["train"]["path"] == "fast"


def test_tokens_cached_by_other_code_are_not_reused(tokenizer, monkeypatch):
    dataset = toy(20)
    first, again = (tokenize.prepare(dataset, tokenizer, 256, "keep_start", None, "train") for _ in "12")
    monkeypatch.setattr(tokenize, "CODE", "another version")
    changed = tokenize.prepare(dataset, tokenizer, 256, "keep_start", None, "train")
    assert first.cache_files == again.cache_files != changed.cache_files


@pytest.mark.parametrize(
    "change",
    [
        lambda t: setattr(t, "chat_template", t.chat_template.replace("<|", "<| ")),
        lambda t: t.add_tokens(["<extra>"]),
        lambda t: t.add_special_tokens({"pad_token": "<pad-2>"}),
        lambda t: setattr(t, "truncation_side", "left" if t.truncation_side == "right" else "right"),
    ],
    ids=["template", "added token", "special token", "side"],
)
def test_tokens_are_reused_by_the_same_tokenizer_loaded_again_and_by_no_other(change):
    """The cache key reads the tokenizer's Rust state as JSON and its Python state, not the Python copies
    of its vocabulary (tokenize.identity); it still tells apart what changes the ids or the template."""
    dataset = toy(20)
    first, again = (
        tokenize.prepare(dataset, t, 256, "keep_start", None, "train")
        for t in map(AutoTokenizer.from_pretrained, [tiny.path()] * 2)
    )
    changed = AutoTokenizer.from_pretrained(tiny.path())
    change(changed)
    other = tokenize.prepare(dataset, changed, 256, "keep_start", None, "train")
    assert first.cache_files == again.cache_files != other.cache_files
