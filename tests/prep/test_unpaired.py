"""Unpaired preference rows for KTO: thumbs-up/down files read directly (format thumbs), pairs split into
a desirable and an undesirable row (--unpaired, dataset.unpair), and KTO's loss weights from the balance."""

import json
from collections import Counter

import pytest
from datasets import Dataset

from data_prep import __main__ as cli
from data_prep import io
from data_prep.pipeline import Options, convert
from data_prep.unpaired import in_range, unpair, weights
from dpo_recipes.sources import assets

THUMBS = [
    {"question": "Name a colour.", "answer": "Red.", "rating": "thumbs_up"},
    {"question": "Name a colour.", "answer": "Banana.", "rating": "down"},
    {"question": "Say hi.", "answer": "Hello!", "rating": 1},
    {"question": "Say hi.", "answer": "Go away.", "rating": False},
    {"question": "Say hi.", "answer": "Hi there.", "rating": "maybe"},
    {"question": "Say hi.", "answer": "  ", "rating": True},
    {"question": "Name a colour.", "answer": "Red.", "rating": "UP"},
]


def thumbs_file(tmp_path):
    path = tmp_path / "thumbs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in THUMBS))
    return path


def test_thumbs_rows_with_a_named_column_mapping_keep_good_labels_and_count_every_drop(tmp_path):
    out = tmp_path / "kto.jsonl"
    mapping = "prompt=question,completion=answer,label=rating"
    assert cli.main(["thumbs", str(thumbs_file(tmp_path)), str(out), "--columns", mapping]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["completion"][0]["content"], r["label"]) for r in kept] == [
        ("Red.", True),
        ("Banana.", False),
        ("Hello!", True),
        ("Go away.", False),
    ]
    assert kept[0]["prompt"] == [{"role": "user", "content": "Name a colour."}]
    report = json.loads(out.with_name("kto.jsonl.report.json").read_text())
    assert report["rows_in"] == 7 and report["rows_out"] == 4
    assert report["dropped"] == {"bad_label": 1, "duplicate": 1, "empty_completion": 1}
    assert report["examples"]["bad_label"][0]["row"] == 5
    assert report["kto_balance"]["desirable"] == 2 and report["kto_balance"]["undesirable"] == 2


def test_thumbs_refuses_score_filters_and_plain_strings_stay_plain_under_auto():
    with pytest.raises(ValueError, match="thumbs rows have no score pair"):
        Options("thumbs", drop_ties=True)
    with pytest.raises(ValueError, match="instruction rows have no score pair"):
        Options("instruction", min_score_margin=1.0)
    rows = Dataset.from_list([{"prompt": "Hi", "completion": " Hello", "label": True}])
    kept, _ = convert(rows, Options("thumbs", style="auto"))
    assert kept[0] == {"prompt": "Hi", "completion": " Hello", "label": True}


def test_each_pair_becomes_one_desirable_and_one_undesirable_row_in_a_seeded_order():
    pairs = Dataset.from_dict(
        {k: [f"{k[0]}{i}" for i in range(50)] for k in ("prompt", "chosen", "rejected")}
    )
    rows, repeats = unpair(pairs, seed=7)
    assert len(rows) == 100 and repeats == 0 and Counter(rows["label"]) == {True: 50, False: 50}
    assert {(r["prompt"], r["completion"], r["label"]) for r in rows} == {
        *((f"p{i}", f"c{i}", True) for i in range(50)),
        *((f"p{i}", f"r{i}", False) for i in range(50)),
    }
    assert rows["completion"] == unpair(pairs, seed=7)[0]["completion"]
    # neither one label after the other (TRL's order) nor a pair's rows side by side throughout
    assert rows["label"][:50] != [True] * 50
    neighbours = sum(a == b for a, b in zip(rows["prompt"], rows["prompt"][1:], strict=False))
    assert neighbours < 10


@pytest.mark.parametrize(
    "desirable,undesirable,expected",
    [
        (50, 50, (1.0, 1.0)),
        (40, 50, (1.25, 1.0)),
        (10, 90, (9.0, 1.0)),
        (130, 100, (1.0, 1.0)),
        (90, 10, (1.0, 9.0)),
    ],
)
def test_kto_weights_bring_the_weighted_ratio_into_the_papers_range(desirable, undesirable, expected):
    balance = weights([True] * desirable + [False] * undesirable)
    assert (balance["desirable_weight"], balance["undesirable_weight"]) == pytest.approx(expected)
    assert in_range(balance)
    assert not in_range({**balance, "desirable_weight": 1.0, "undesirable_weight": 1.0}) or expected == (1, 1)


def test_unpaired_cli_writes_what_dataset_unpair_gives_a_run(tmp_path):
    """`make prep ... ARGS=--unpaired` and a recipe's dataset.unpair split the same pairs the same way."""
    from dpo_recipes.config.schema import DatasetSchema
    from dpo_recipes.training import data

    toy = assets.unpacked("data/toy/train.jsonl")
    out = tmp_path / "toy_kto.jsonl"
    assert cli.main(["trl", str(toy), str(out), "--unpaired"]) == 0
    assert cli.main(["thumbs", str(out), str(tmp_path / "again.jsonl"), "--unpaired"]) == 2
    written = io.read(str(out))
    loaded, _, report = data.load(DatasetSchema(path=str(toy), unpair=True), seed=42)
    assert written.to_list() == loaded.to_list()
    repeats = report["train"]["unpaired_repeats_dropped"]  # pairs sharing a prompt and an answer
    assert repeats > 0 and report["train"]["rows_unpaired"] == 2 * report["train"]["rows_out"] - repeats
    reread, _, _ = data.load(DatasetSchema(path=str(out), format="thumbs"), seed=42)
    assert reread.to_list() == loaded.to_list()


def test_instruction_data_is_read_as_answers_rated_up_for_sft():
    from dpo_recipes.training import data

    rows = Dataset.from_list(
        [
            {"instruction": "Translate.", "input": "Good morning", "output": "Bonjour.", "system": None},
            {"instruction": "Say hi.", "input": None, "output": "Hello!", "system": "Be brief."},
            {"instruction": "Say hi.", "input": None, "output": None, "system": None},
        ]
    )
    kept, report = convert(rows, Options("instruction"))
    assert report["dropped"] == {"missing_field": 1}
    assert kept[1] == {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
        "completion": [{"role": "assistant", "content": "Hello!"}],
        "label": True,
    }
    assert data.completions(kept)[0]["completion"] == [{"role": "assistant", "content": "Bonjour."}]
    thumbs = Dataset.from_list(
        [
            {"prompt": "p", "completion": "up", "label": True},
            {"prompt": "p", "completion": "down", "label": False},
        ]
    )
    assert data.completions(thumbs).to_list() == [{"prompt": "p", "completion": "up"}]
