"""Read a data file or a Hub dataset into rows, and take a first look at what its rows hold (`shape`),
for the checks and the diagnosis a conversion reports."""

import contextlib
import json
from pathlib import Path

from datasets import Dataset

from data_prep import io
from data_prep.convert import (
    objects_in,
)

BLANK = "_blank"  # an empty .jsonl line: not a row, not counted


def read(path: str, split: str = "train", subset: str | None = None) -> Dataset:
    """Like `io.read`, but a .json or .jsonl file is read as raw rows (a .jsonl line or an array item
    as text) and parsed in the row step: a broken line, invalid UTF-8 or a row of other types is then
    an ordinary counted rule, and the good rows survive."""
    suffix = Path(path).suffix
    if suffix not in (".json", ".jsonl") or not Path(path).is_file():
        return io.read(path, split, subset)
    if Path(path).stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    if suffix == ".jsonl":
        stat = Path(path).stat()  # in the cache key: a changed file is read again
        return Dataset.from_generator(
            _lines, gen_kwargs={"path": path, "stamp": (stat.st_size, stat.st_mtime_ns)}
        )
    try:
        rows = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte {err.start}); re-encode it or use .jsonl"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a .json file must hold an array of rows")
    raw = [json.dumps(r, ensure_ascii=False) for r in rows]
    return Dataset.from_dict({"_raw": raw, "_line_error": [""] * len(rows)})


def _lines(path: str, stamp):
    """Each line of a .jsonl file as text, with why it cannot be read when its bytes are not UTF-8."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                yield {"_raw": line.decode("utf-8"), "_line_error": ""}
            except UnicodeDecodeError as err:
                yield {"_raw": "", "_line_error": f"line {number}: not valid UTF-8 (byte {err.start})"}


def first_rows(dataset: Dataset, n: int = 1000) -> list[dict]:
    """The first rows as objects: a typed dataset's, or raw rows parsed (unreadable ones left out)."""
    head = dataset.select(range(min(n, len(dataset))))
    if "_raw" not in dataset.column_names:
        return head.to_list()
    rows = []
    for text in head["_raw"]:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(text))
    return [row for row in rows if isinstance(row, dict)]


def shape(rows: list[dict], role_key: str) -> dict[str, list[str]]:
    """What the rows hold: columns, the keys of their messages (objects in a column or in a list in
    one), the role names under `role_key`, and the keys of typed content parts."""
    found = {"columns": {}, "message keys": {}, "roles": {}, "part keys": {}}
    for row in rows:
        found["columns"].update(dict.fromkeys(row))
        for message in objects_in(row):
            found["message keys"].update(dict.fromkeys(message))
            if isinstance(message.get(role_key), str):
                found["roles"][message[role_key]] = None
            for part in objects_in(message):
                found["part keys"].update(dict.fromkeys(part))
    return {what: list(names) for what, names in found.items()}
