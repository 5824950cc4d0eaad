"""data_prep: golden rows for every format, one test per validation rule, and the CLI's guarantees."""

import json
from pathlib import Path

import pytest
from datasets import Dataset

from data_prep import __main__ as cli
from data_prep import convert as rows
from data_prep import io, pipeline, tokens
from data_prep.convert import RULES, Invalid
from data_prep.pipeline import Options, convert
from data_prep.reading import read
from dpo_recipes.sources import assets

FIXTURES = Path(__file__).parents[1] / "fixtures"


def user(text):
    return {"role": "user", "content": text}


def answer(text):
    return [{"role": "assistant", "content": text}]


# The four pairs every fixture layout holds, in TRL's conversational explicit-prompt form.
GOLDEN = [
    {"prompt": [user("Name a primary colour.")], "chosen": answer("Red."), "rejected": answer("Banana.")},
    {
        "prompt": [user("Translate to French.\n\nGood morning")],
        "chosen": answer("Bonjour."),
        "rejected": answer("Hola."),
    },
    {
        "prompt": [
            {"role": "system", "content": "You are a translator."},
            user("Translate to French: Good morning"),
            {"role": "assistant", "content": "Bonjour."},
            user("And in German?"),
        ],
        "chosen": answer("Guten Morgen."),
        "rejected": answer("Buongiorno."),
    },
    {"prompt": [user("Add 2 and 2.")], "chosen": answer("4"), "rejected": answer("5")},
]


def pairs(dataset: Dataset) -> list[dict]:
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in dataset]


@pytest.mark.parametrize(
    "fmt,name",
    [("alpaca", "alpaca.json"), ("ultrafeedback", "ultrafeedback.jsonl"), ("sharegpt", "sharegpt.json")],
)
def test_golden_rows_for_every_format(fmt, name):
    kept, report = convert(read(str(FIXTURES / name)), Options(format=fmt))
    assert pairs(kept) == GOLDEN
    assert report["rows_in"] == report["rows_out"] == 4 and report["dropped"] == {}


def test_alpaca_joins_input_with_a_blank_line_and_reads_output_pairs():
    row = rows.alpaca({"instruction": "Summarise.", "input": "Some text.", "output": ["Short.", "Long."]})
    assert row["prompt"] == [user("Summarise.\n\nSome text.")]
    assert (row["chosen"], row["rejected"]) == (answer("Short."), answer("Long."))


def test_typed_content_parts_are_joined():
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there."}]
    row = rows.trl({"prompt": [{"role": "user", "content": parts}], "chosen": "Hi!", "rejected": "Go away."})
    assert row["prompt"] == [user("Hello there.")]


def test_trl_strings_become_turns_and_standard_style_gives_strings():
    row = rows.trl({"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Banana."})
    assert row == {
        "prompt": [user("Name a colour.")],
        "chosen": answer("Red."),
        "rejected": answer("Banana."),
    }
    standard = {"prompt": "User: Name a colour.\n\nAssistant:", "chosen": " Red.", "rejected": " Banana."}
    assert rows.to_standard(row) == standard  # one rule for every row: a transcript, answers after a space
    multi = rows.to_standard(GOLDEN[2])
    assert multi["prompt"].endswith("User: And in German?\n\nAssistant:")
    assert multi["chosen"] == " Guten Morgen."


def test_scores_are_kept_and_other_columns_dropped():
    kept, _ = convert(read(str(FIXTURES / "ultrafeedback.jsonl")), Options(format="ultrafeedback"))
    assert kept.column_names == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]
    assert kept[0]["score_chosen"] == 9.0
    with pytest.raises(ValueError, match="prompt"):
        Options("ultrafeedback", keep_columns=["prompt"])


def test_columns_can_be_remapped():
    data = Dataset.from_list([{"q": "Name a colour.", "good": "Red.", "bad": "Banana.", "id": 7}])
    options = Options(
        format="trl", columns={"prompt": "q", "chosen": "good", "rejected": "bad"}, keep_columns=["id"]
    )
    kept, _ = convert(data, options)
    assert kept[0]["prompt"] == [user("Name a colour.")] and kept[0]["id"] == 7


def test_json_is_read_raw_and_checked_against_the_columns_found(tmp_path):
    src = tmp_path / "in.jsonl"
    row = {"q": "Name a colour.", "good": "Red.", "bad": "Banana.", "id": 7, "tags": ["a"]}
    src.write_text(json.dumps(row) + "\n")
    data = read(str(src))
    assert data.column_names == ["_raw", "_line_error"]  # parsed in the row step, like a broken line
    mapped = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    kept, _ = convert(data, Options(format="trl", columns=mapped, keep_columns=["id", "tags"]))
    assert kept[0]["id"] == 7 and kept[0]["tags"] == ["a"]  # kept columns keep their JSON types
    lacks = r"names columns the input lacks: answer \(its first rows have q, good, bad, id, tags\)"
    with pytest.raises(ValueError, match="--columns " + lacks):
        convert(data, Options(format="trl", columns={**mapped, "chosen": "answer"}))
    with pytest.raises(ValueError, match="--keep-columns " + lacks):
        convert(data, Options(format="trl", columns=mapped, keep_columns=["answer"]))


def ok(**extra):
    return {"prompt": [user("Hi.")], "chosen": answer("Hello!"), "rejected": answer("Go away."), **extra}


# One row breaking each rule (malformed_line and duplicate have tests of their own).
BROKEN = {
    "missing_field": {"prompt": [user("Hi.")], "chosen": answer("Hello!")},
    "wrong_type": {"prompt": 42, "chosen": answer("Hello!"), "rejected": answer("No.")},
    "empty_prompt": ok(prompt=[user("   ")]),
    "empty_completion": ok(chosen=answer(" \n ")),
    "identical_pair": ok(rejected=answer("Hello!")),
    "unknown_role": ok(prompt=[{"role": "wizard", "content": "Hi."}]),
    "bad_role_order": ok(prompt=[user("Hi."), {"role": "assistant", "content": "Hello."}]),
    "unpaired_surrogate": ok(chosen=answer("Hello \ud800!")),  # valid JSON, yet no UTF-8 file holds it
}


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_each_rule_is_named_in_the_report(rule):
    data = Dataset.from_list([{"row": json.dumps(r)} for r in (ok(), BROKEN[rule])])
    kept, report = convert(data.rename_column("row", "_raw"), Options(format="trl"))
    assert len(kept) == 1
    assert report["dropped"] == {rule: 1}
    assert report["examples"][rule][0]["row"] == 2
    assert rule in RULES


def test_prompt_mismatch_between_chosen_and_rejected_or_the_prompt_field():
    base = [user("Hi.")]
    with pytest.raises(Invalid, match="prompt_mismatch"):
        rows.ultrafeedback({"chosen": [*base, *answer("a")], "rejected": [user("Bye."), *answer("b")]})
    with pytest.raises(Invalid, match="prompt_mismatch"):
        rows.ultrafeedback(
            {"prompt": "Hello?", "chosen": [*base, *answer("a")], "rejected": [*base, *answer("b")]}
        )


def test_turns_shared_by_chosen_and_rejected_are_compared_after_conversion():
    """The same prompt spelled with other keys or role aliases is one prompt; other text is not."""
    turns = [{"role": "system", "content": "Be brief."}, {"role": "human", "content": "Hi.", "w": 1}]
    again = [turns[0], {"role": "user", "content": [{"type": "text", "text": "Hi."}], "w": 0}]
    pair = rows.ultrafeedback({"chosen": [*turns, *answer("a")], "rejected": [*again, *answer("b")]})
    assert pair["prompt"] == [{"role": "system", "content": "Be brief."}, user("Hi.")]
    assert pair["chosen"] == answer("a") and pair["rejected"] == answer("b")
    other = [turns[0], user("Hello.")]
    with pytest.raises(Invalid, match="prompt_mismatch"):
        rows.ultrafeedback({"chosen": [*turns, *answer("a")], "rejected": [*other, *answer("b")]})
    with pytest.raises(Invalid, match=r"`rejected`\[2\] has no `content`"):
        rows.ultrafeedback({"chosen": [*turns, *answer("a")], "rejected": [*turns, {"role": "assistant"}]})


def test_score_ties_and_low_margins_when_asked():
    data = read(str(FIXTURES / "ultrafeedback.jsonl"))
    _, report = convert(data, Options(format="ultrafeedback", drop_ties=True))
    assert report["dropped"] == {"score_tie": 1} and report["examples"]["score_tie"][0]["row"] == 3
    _, report = convert(data, Options(format="ultrafeedback", min_score_margin=1.0))
    assert report["dropped"] == {"low_margin": 2}
    assert [e["row"] for e in report["examples"]["low_margin"]] == [2, 3]


def test_a_score_that_is_not_a_number_drops_its_row_not_the_file(tmp_path):
    src = tmp_path / "in.jsonl"
    scored = [
        ok(score_chosen=8, score_rejected=3),
        ok(chosen=answer("Hey!"), score_chosen="8", score_rejected=3),
    ]
    scored.append(ok(chosen=answer("Yo!"), score_chosen=9.5, score_rejected=True))
    src.write_text("".join(json.dumps(row) + "\n" for row in scored))
    kept, report = convert(read(str(src)), Options(format="trl"))
    assert kept["score_chosen"] == [8.0] and report["dropped"] == {"wrong_type": 2}
    details = [e["detail"] for e in report["examples"]["wrong_type"]]
    assert details == [
        "`score_chosen` should be a number, got str",
        "`score_rejected` should be a number, got bool",
    ]


def test_exact_duplicates_are_dropped_and_point_to_the_first():
    data = Dataset.from_list([ok(), ok(chosen=answer("Hey!")), ok()])
    kept, report = convert(data, Options(format="trl"))
    assert len(kept) == 2 and report["dropped"] == {"duplicate": 1}
    assert report["examples"]["duplicate"][0] == {
        "row": 3,
        "detail": "repeats row 1",
        "excerpt": json.dumps([user("Hi.")]),
    }


def run_cli(*args) -> int:
    return cli.main([str(a) for a in args])


def test_jsonl_with_a_broken_line_keeps_the_rest(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run_cli("trl", FIXTURES / "broken.jsonl", out) == 0
    assert capsys.readouterr().out.strip().endswith("kept 2 of 3 rows (dropped: malformed_line=1)")
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["examples"]["malformed_line"][0]["row"] == 2
    assert report["examples"]["malformed_line"][0]["detail"].startswith("line 2:")
    assert len(out.read_text().splitlines()) == 2


def test_strict_mode_fails_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run_cli("trl", FIXTURES / "broken.jsonl", out, "--strict") == 1
    assert "row 2: malformed_line" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_without_force(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    assert run_cli("sharegpt", FIXTURES / "sharegpt.json", out) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "precious\n"
    assert run_cli("sharegpt", FIXTURES / "sharegpt.json", out, "--force") == 0
    assert len(out.read_text().splitlines()) == 4


def test_nothing_kept_exits_nonzero(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(BROKEN["identical_pair"]) + "\n")
    assert run_cli("trl", bad, tmp_path / "out.jsonl") == 1
    assert not (tmp_path / "out.jsonl").exists()
    assert json.loads((tmp_path / "out.jsonl.report.json").read_text())["dropped"] == {"identical_pair": 1}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ""])
def test_output_kinds_and_reconverting_with_trl_is_a_no_op(tmp_path, suffix):
    first, second = tmp_path / f"first{suffix}", tmp_path / f"second{suffix}"
    assert run_cli("alpaca", FIXTURES / "alpaca.json", first) == 0
    assert run_cli("trl", first, second) == 0
    assert pairs(io.read(str(first))) == pairs(io.read(str(second))) == GOLDEN


def test_report_location_and_token_statistics(tmp_path, capsys):
    from dpo_recipes.sources import tiny

    report = tmp_path / "elsewhere.json"
    args = ["--report", report, "--tokenizer", tiny.path(), "--max-length", 12]
    assert run_cli("ultrafeedback", FIXTURES / "ultrafeedback.jsonl", tmp_path / "o.jsonl", *args) == 0
    stats = json.loads(report.read_text())
    assert set(stats["token_lengths"]) == {"prompt", "chosen", "rejected"}
    assert stats["token_lengths"]["prompt"]["max"] >= stats["token_lengths"]["prompt"]["median"] > 0
    assert 1 <= stats["trl_would_drop"] <= 4
    # what counted them: a run with another tokenizer or template plans without them (memory.py)
    assert stats["counted_with"] == {"tokenizer": str(tiny.path().resolve()), "chat_template": "its own"}
    out = capsys.readouterr().out
    assert f"TRL would drop {stats['trl_would_drop']} of 4 rows" in out and "median tokens: prompt" in out


@pytest.mark.parametrize("style", ["conversational", "standard"])
def test_token_lengths_are_what_trl_tokenizes_in_either_style(style):
    from transformers import AutoTokenizer

    from dpo_recipes.sources import tiny

    tokenizer = AutoTokenizer.from_pretrained(tiny.path())
    kept, _ = convert(
        Dataset.from_list([ok(), ok(chosen=answer("Hello there, friend!"))]), Options("trl", style)
    )
    stats = tokens.token_lengths(kept, tokenizer, max_length=None)["token_lengths"]
    row = kept[1]
    if style == "standard":
        prompt = len(tokenizer(row["prompt"])["input_ids"])
        chosen = len(tokenizer(row["prompt"] + row["chosen"])["input_ids"]) - prompt
    else:
        template = tokenizer.apply_chat_template
        prompt = len(template(row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"])
        chosen = len(template(row["prompt"] + row["chosen"], return_dict=True)["input_ids"]) - prompt
    assert stats["prompt"]["max"] == prompt and stats["chosen"]["max"] == chosen > 3


def test_real_data_in_three_layouts_converts_to_the_same_pairs():
    files = {
        "alpaca": "dpo_en_demo.alpaca.json",
        "sharegpt": "dpo_en_demo.sharegpt.json",
        "ultrafeedback": "dpo_en_demo.ultrafeedback.jsonl",
    }
    results = {
        fmt: convert(read(str(assets.unpacked(f"data/real/{name}"))), Options(format=fmt))
        for fmt, name in files.items()
    }
    contents = [pairs(kept) for kept, _ in results.values()]
    assert contents[0] == contents[1] == contents[2]
    assert all(report["rows_in"] == 300 for _, report in results.values())
    assert len(contents[0]) + sum(results["alpaca"][1]["dropped"].values()) == 300


def test_conversions_cached_by_other_code_are_not_reused(tmp_path, monkeypatch):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"instruction": "Hi", "chosen": "Hello", "rejected": "No"}) + "\n")
    first, _ = convert(read(str(path)), Options("alpaca"))
    again, _ = convert(read(str(path)), Options("alpaca"))
    monkeypatch.setattr(pipeline, "CODE", "another version")
    changed, _ = convert(read(str(path)), Options("alpaca"))
    assert first.cache_files == again.cache_files != changed.cache_files


TYPED = FIXTURES / "typed_parts.jsonl"  # whole conversations under other names, typed parts, loss_weight
MAPPED = ["--columns", "chosen=chosen_messages,rejected=rejected_messages"]


def test_typed_parts_conversations_convert_with_one_command(tmp_path):
    out = tmp_path / "out.jsonl"
    assert run_cli("ultrafeedback", TYPED, out, *MAPPED) == 0
    first = json.loads(out.read_text().splitlines()[0])
    assert first["prompt"][1] == user("宾夕法尼亚州的首府是哪里？") and first["chosen"] == answer(
        "哈里斯堡。"
    )
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["rows_out"] == 5 and report["dropped"] == {}
    assert report["ignored_message_keys"] == {"loss_weight": 5}  # counted once per row, not an error


def test_nothing_converting_prints_a_diagnosis_that_names_the_fix(tmp_path, capsys):
    assert run_cli("alpaca", TYPED, tmp_path / "out.jsonl") == 1
    err = capsys.readouterr().err
    assert "5 rows dropped for missing_field, e.g. `instruction` is missing" in err
    assert "columns in the first rows: id, chosen_messages, rejected_messages" in err
    assert "keys of their messages: role, content, loss_weight" in err
    assert "fits best: ultrafeedback --columns chosen=chosen_messages,rejected=rejected_messages" in err
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["diagnosis"]["fits_best"]["kept"] == 5


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--role-key", "speaker"],
            "--role-key names message keys the input lacks: speaker (its first rows have role, content, loss_weight)",
        ),
        (
            ["--roles", "wizard=user"],
            "--roles names roles the input lacks: wizard (its first rows have system, user, assistant)",
        ),
        (
            ["--text-key", "body"],
            "--text-key names part keys the input lacks: body (its first rows have type, value)",
        ),
        (["--columns", "prompt=question"], "--columns names columns the input lacks: question"),
    ],
)
def test_mapping_names_the_input_lacks_are_refused_with_what_it_has(flags, message, tmp_path, capsys):
    assert run_cli("ultrafeedback", TYPED, tmp_path / "out.jsonl", *MAPPED[:0], *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_messages_in_other_spellings_convert(tmp_path):
    row = {
        "turns": [{"speaker": "Q", "text": "Name a colour."}],
        "good": {"speaker": "A", "text": "Red."},
        "bad": {"speaker": "A", "text": "Banana."},
    }
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(row) + "\n")
    args = ["--columns", "conversations=turns,chosen=good,rejected=bad", "--role-key", "speaker"]
    args += ["--content-key", "text", "--roles", "Q=user,A=assistant"]
    assert run_cli("sharegpt", src, tmp_path / "out.jsonl", *args) == 0
    kept = json.loads((tmp_path / "out.jsonl").read_text())
    assert kept == {
        "prompt": [user("Name a colour.")],
        "chosen": answer("Red."),
        "rejected": answer("Banana."),
    }
    with pytest.raises(ValueError, match="map a role name to system, user or assistant"):
        Options("sharegpt", messages=pipeline.Messages(roles={"Q": "human"}))


def test_each_output_has_its_own_report_never_replaced_and_in_utf8(tmp_path, capsys):
    bad = {"instruction": "宾夕法尼亚州的首府是哪里？", "chosen": "哈里斯堡。", "rejected": "哈里斯堡。"}
    src = tmp_path / "zh.alpaca.json"
    src.write_text(json.dumps([bad, {**bad, "rejected": "费城。"}], ensure_ascii=False))
    for out in ("zh.a.jsonl", "zh.b.jsonl"):
        assert run_cli("alpaca", src, tmp_path / out) == 0
    reports = sorted(p.name for p in tmp_path.glob("*.report.json"))
    assert reports == ["zh.a.jsonl.report.json", "zh.b.jsonl.report.json"]
    text = (tmp_path / "zh.a.jsonl.report.json").read_text()
    assert "宾夕法尼亚州" in text and "\\u5bbe" not in text  # excerpts as written
    (tmp_path / "zh.a.jsonl").unlink()  # the output gone, its report still there: not replaced silently
    assert run_cli("alpaca", src, tmp_path / "zh.a.jsonl") == 2
    assert "zh.a.jsonl.report.json exists; pass --force" in capsys.readouterr().err


def test_a_hub_dataset_is_read_with_its_config_name(monkeypatch):
    calls = []
    monkeypatch.setattr(
        io, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or Dataset.from_list([])
    )
    read("someone/prefs", "train_prefs", "zh")
    assert calls == [(("someone/prefs", "zh"), {"split": "train_prefs"})]
