"""Adversarial inputs through every entry point: each gives a clear error or a counted skip, never a
traceback and never a partial output."""

import json

import pytest
from conftest import tiny_overrides

from data_prep import __main__ as prep
from dpo_recipes import config, errors, train
from dpo_recipes.errors import DataError

GOOD = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


CASES = {
    "wrong_types.jsonl": jsonl({"prompt": 7, "chosen": ["x"], "rejected": None}, GOOD),
    "huge_string.jsonl": jsonl({**GOOD, "prompt": "word " * 200_000}, GOOD),
    "invalid_utf8.jsonl": jsonl(b'{"prompt": "caf\xff\xfe", "chosen": "a", "rejected": "b"}', GOOD),
    "unexpected_nesting.jsonl": jsonl({**GOOD, "chosen": {"a": {"b": [{"c": [1, 2, {"d": "e"}]}]}}}, GOOD),
    "not_objects.jsonl": jsonl([1, 2, 3], "just a string", GOOD),
    "empty.jsonl": b"",
    "empty_array.json": b"[]",
    "not_an_array.json": b'{"prompt": "x"}',
    "invalid_utf8.json": b'[{"prompt": "caf\xff"}]',
    "garbage.parquet": b"PAR1 this is not parquet at all",
}


ALL_VALID = {"huge_string.jsonl"}  # odd but valid rows: kept, and TRL's length limit is reported


@pytest.fixture(params=sorted(CASES))
def bad_file(request, tmp_path):
    path = tmp_path / request.param
    path.write_bytes(CASES[request.param])
    return path


def test_data_prep_cli(bad_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code = prep.main(["trl", str(bad_file), str(out)])  # an uncaught exception fails the test
    err = capsys.readouterr()
    if code == 0:
        kept, total = (int(x) for x in err.out.split("kept ")[1].split(" rows")[0].split(" of "))
        assert len(out.read_text().splitlines()) == kept
        assert kept == total if bad_file.name in ALL_VALID else 0 < kept < total  # bad rows were counted
    else:
        assert not out.exists()  # never a partial output
        assert "error:" in err.err or "kept 0 of" in err.out


def test_strict_mode(bad_file, tmp_path):
    code = prep.main(["trl", str(bad_file), str(tmp_path / "out.jsonl"), "--strict"])
    assert (code == 0) == (bad_file.name in ALL_VALID)
    assert (tmp_path / "out.jsonl").exists() == (code == 0)


@pytest.mark.slow
def test_training(bad_file, tmp_path):
    cfg, recipe = config.compose(
        tiny_overrides("tiny_lora_dpo", f"dataset.path={bad_file}", "dataset.eval_path=null")
    )
    try:
        trainer = train.run(cfg, tmp_path / "run", recipe)
    except (DataError, errors.ConfigError, errors.Stopped) as err:  # printed as `error: ...` by the CLI
        assert str(err)
        assert not (tmp_path / "run" / "dpo_metrics" / "summary.json").exists()
    else:
        report = json.loads((tmp_path / "run" / "dpo_metrics" / "data_report.json").read_text())
        assert (
            sum(report["train"]["dropped"].values()) + report["train"].get("trl_dropped_prompt_too_long", 0)
            > 0
        )
        assert trainer.state.global_step == 2
