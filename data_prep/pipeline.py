"""Run the row converters over a whole dataset with `datasets.map`, counting every row that is dropped."""

import collections
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, Json, List, Value

from data_prep.convert import (
    ANSWER_COLUMNS,
    ANSWERS,
    CONVERTERS,
    PAIRED,
    ROLES,
    RULES,
    STYLES,
    Invalid,
    Messages,
    extra_keys,
    to_text,
)
from data_prep.reading import BLANK, first_rows, shape

EXAMPLES_PER_RULE = 5
WHY = ("_rule", "_detail", "_excerpt", "_key")  # per converted row: why it was dropped, its dedup key


def source_hash(*paths: Path) -> str:
    """A cache key for code: `datasets` keys a map on a module-level function's name, not its code, so
    without this a result cached by an older version of the files would be served again."""
    return hashlib.sha256(b"".join(Path(p).read_bytes() for p in paths)).hexdigest()[:16]


CODE = source_hash(Path(__file__), Path(__file__).with_name("convert.py"))


@dataclass
class Options:
    format: str
    style: str = "conversational"  # or standard (plain strings), or auto (as the rows are): STYLES
    columns: dict[str, str] = field(default_factory=dict)  # our field name -> the input's column name
    keep_columns: list[str] = field(default_factory=list)
    messages: Messages = field(default_factory=Messages)  # how the input spells its messages
    min_score_margin: float | None = None
    drop_ties: bool = False
    num_proc: int | None = None

    def __post_init__(self):
        if self.format not in CONVERTERS:
            raise ValueError(f"unknown format {self.format!r}; choose one of {', '.join(CONVERTERS)}")
        if self.format in ANSWERS and (self.min_score_margin is not None or self.drop_ties):
            raise ValueError(
                f"{self.format} rows have no score pair: --min-score-margin and --drop-ties are for pairs"
            )
        clash = set(self.keep_columns) & {*self.written, "score_chosen", "score_rejected"}
        if clash:
            raise ValueError(f"keep-columns cannot name {sorted(clash)}: the conversion writes them")
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; choose one of {', '.join(STYLES)}")
        wrong = {k: v for k, v in self.messages.roles.items() if v not in set(ROLES.values())}
        if wrong:
            raise ValueError(f"roles {wrong}: map a role name to system, user or assistant")
        self.rename = {theirs: ours for ours, theirs in self.columns.items()}  # read for every row

    @property
    def written(self) -> tuple[str, ...]:
        """The columns the conversion writes: prompt, chosen, rejected; or prompt, completion, label."""
        if self.format in ANSWERS:
            return ("prompt", *ANSWERS[self.format], "label")
        return ("prompt", *PAIRED)


def _features(dataset: Dataset, options: Options, scores: list[str]) -> Features:
    message = List({"role": Value("string"), "content": Value("string")})
    text = Value("string") if options.style == "standard" else message
    out = {name: Value("bool") if name == "label" else text for name in options.written}
    out.update({name: Value("float64") for name in scores})
    for name in options.keep_columns:
        out[name] = Json() if "_raw" in dataset.column_names else dataset.features[name]  # JSON: any type
    out.update({name: Value("string") for name in WHY})
    return Features(out)


def _scores(row: dict, options: Options) -> dict:
    scores = {k: row.get(k) for k in ("score_chosen", "score_rejected") if k in row}
    for name, value in scores.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise Invalid("wrong_type", f"`{name}` should be a number, got {type(value).__name__}")
    if options.min_score_margin is None and not options.drop_ties:
        return scores
    for name in ("score_chosen", "score_rejected"):
        if scores.get(name) is None:
            raise Invalid("missing_field", f"`{name}` is needed for score filtering")
    margin = row["score_chosen"] - row["score_rejected"]
    if options.drop_ties and margin == 0:
        raise Invalid("score_tie", f"both scores are {row['score_chosen']}")
    if options.min_score_margin is not None and margin < options.min_score_margin:
        raise Invalid("low_margin", f"margin {margin:g} < {options.min_score_margin:g}")
    return scores


def _convert_row(source, index: int, options: Options) -> tuple[dict, dict]:
    """One input row (a dict, or a raw .jsonl line) -> (pair with scores, the parsed source row)."""
    if isinstance(source, str):
        try:
            source = json.loads(source)
        except json.JSONDecodeError as err:
            raise Invalid("malformed_line", f"line {index + 1}: {err.msg}") from None
    if not isinstance(source, dict):
        raise Invalid("wrong_type", f"a row should be an object, got {type(source).__name__}")
    row = {options.rename.get(k, k): v for k, v in source.items()} if options.rename else source
    pair = CONVERTERS[options.format](row, options.messages)
    pair.update(_scores(row, options))
    return (to_text(pair, row) if options.style == "standard" else pair), source


def _key(pair: dict) -> str:
    """The pair's digest for finding duplicates: every role and text, each behind its length, so that
    no two different pairs give the same string. Encoding every text here is also where a text that
    UTF-8 cannot hold is found, before Arrow would fail the whole file on it."""
    sides = [pair[side] for side in ("prompt", *ANSWER_COLUMNS) if side in pair]
    texts = ([str(pair["label"])] if "label" in pair else []) + [
        t
        for side in sides
        for t in ([side] if isinstance(side, str) else (v for m in side for v in m.values()))
    ]
    joined = "".join([f"{len(t)}:{t}" for t in texts])
    try:
        return hashlib.sha1(joined.encode()).hexdigest()
    except UnicodeEncodeError as err:
        bad = err.object[err.start : err.end].encode("unicode_escape").decode()
        raise Invalid("unpaired_surrogate", f"a text holds {bad}, which UTF-8 cannot store") from None


def _convert_batch(batch: dict, indices: list[int], options: Options, features: Features, code: str):
    """The batch as an Arrow table of `features`, so that `datasets` infers no types from the rows.
    `code` (CODE) only keys the cache."""
    scores = [name for name in ("score_chosen", "score_rejected") if name in features]
    raw, line_errors = batch.get("_raw"), batch.get("_line_error")
    empty = "" if options.style == "standard" else []
    columns = (*options.written, *scores)
    blank = tuple(None if name == "label" else empty for name in options.written)
    dropped = blank + (None,) * (len(scores) + len(options.keep_columns))
    out = []
    for j, index in enumerate(indices):
        given = raw[j] if raw is not None else {k: batch[k][j] for k in batch}
        if line_errors and line_errors[j]:
            out.append((*dropped, "malformed_line", line_errors[j], "", ""))
            continue
        if raw is not None and not given.strip():
            out.append((*dropped, BLANK, "", "", ""))
            continue
        try:
            pair, source = _convert_row(given, index, options)
            key = _key(pair)
        except Invalid as err:
            text = given if raw is not None else json.dumps(given, default=str, ensure_ascii=False)
            out.append((*dropped, err.rule, err.detail, text[:160], ""))
            continue
        kept = [pair.get(name) for name in columns] + [source.get(name) for name in options.keep_columns]
        out.append((*kept, "", "", "", key))
    table = {name: [row[i] for row in out] for i, name in enumerate(features)}
    for name in options.keep_columns:  # the input's own types (JSON text where it is read raw)
        table[name] = features.encode_column(table[name], name)
    return pa.Table.from_pydict(table, schema=features.arrow_schema)


def _check_names(options: Options, found: dict[str, list[str]]) -> None:
    """Every name a mapping option gives must occur in the input: else the names it does hold."""
    spelled = options.messages
    named = [
        ("--columns", options.columns.values(), "columns"),
        ("--keep-columns", options.keep_columns, "columns"),
        ("--role-key", [spelled.role_key], "message keys"),
        ("--content-key", [spelled.content_key], "message keys"),
        ("--roles", spelled.roles, "roles"),
        ("--text-key", [spelled.text_key], "part keys"),
    ]
    for flag, names, where in named:
        missing = [name for name in names if name and name not in found[where]]
        if missing:
            have = ", ".join(found[where]) or "none"
            raise ValueError(
                f"{flag} names {where} the input lacks: {', '.join(missing)} (its first rows have {have})"
            )


def convert(dataset: Dataset, options: Options, desc: str = "Converting") -> tuple[Dataset, dict]:
    """Return (kept rows in TRL's form, report). Nothing is dropped without a rule and a count."""
    raw = "_raw" in dataset.column_names
    score_columns = {options.columns.get(k, k) for k in ("score_chosen", "score_rejected")}
    paired = options.format not in ANSWERS
    scores = (
        ["score_chosen", "score_rejected"]
        if paired and (raw or score_columns & set(dataset.column_names))
        else []
    )
    if len(dataset) == 0:
        raise ValueError("the input holds no rows")
    sample, role_and_content = first_rows(dataset), options.messages.keys(options.format)
    if options.style == "auto":  # plain strings stay plain text; anything else is conversational
        first = {options.rename.get(k, k): v for k, v in (sample[:1] or [{}])[0].items()}
        plain = options.format in ("trl", *ANSWERS) and isinstance(first.get("prompt"), str)
        options = dataclasses.replace(options, style="standard" if plain else "conversational")
    found = shape(sample, role_and_content[0])
    _check_names(options, found)
    features = _features(dataset, options, scores)
    converted = dataset.map(
        _convert_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"options": options, "features": features, "code": CODE},
        remove_columns=dataset.column_names,
        features=features,
        num_proc=options.num_proc,
        desc=desc,
    )
    seen, keep, blanks = {}, [], 0
    first_of: dict[int, int] = {}  # duplicate row -> the earlier row it repeats
    dropped: dict[str, list[int]] = {}
    columns = converted.data  # read through Arrow: a datasets column decodes row by row
    rules, keys = columns.column("_rule").to_pylist(), columns.column("_key").to_pylist()
    for index, (rule, key) in enumerate(zip(rules, keys, strict=True)):
        if rule == BLANK:
            blanks += 1
            continue
        if not rule and key in seen:
            rule, first_of[index] = "duplicate", seen[key]
        if rule:
            dropped.setdefault(rule, []).append(index)
        else:
            seen[key] = index
            keep.append(index)
    kept = converted.select(np.array(keep, dtype=np.int64)).remove_columns(list(WHY))  # hashed as one buffer
    if scores and raw and (not keep or columns.column("score_chosen").take(keep).null_count == len(keep)):
        kept = kept.remove_columns(scores)
    report = {
        "format": options.format,
        "style": options.style,
        "rows_in": len(converted) - blanks,
        "rows_out": len(kept),
        "dropped": {rule: len(indices) for rule, indices in sorted(dropped.items())},
        "examples": {
            rule: _examples(converted, rule, indices[:EXAMPLES_PER_RULE], first_of)
            for rule, indices in sorted(dropped.items())
        },
        # Keys of the messages besides role and content (a loss_weight, say): ignored; rows of the sample.
        "ignored_message_keys": dict(
            collections.Counter(k for row in sample for k in extra_keys(row, role_and_content))
        ),
    }
    report["diagnosis"] = diagnose(report, sample, found, options)
    return kept, report


# The fields the converters read, for guessing a column mapping from the names a file has.
FIELDS = (
    "prompt",
    "chosen",
    "rejected",
    "instruction",
    "input",
    "output",
    "conversations",
    "system",
    "history",
    "completion",
    "label",
)
SAMPLE_FIT = 100


def _keeps(row: dict, options: Options) -> bool:
    try:
        _convert_row(row, 0, options)
    except Invalid:
        return False
    return True


def diagnose(report: dict, sample: list[dict], found: dict, options: Options) -> dict | None:
    """Where more than half the rows drop for one rule: what was looked for, what the first rows hold,
    and the format (with a column mapping guessed from the names) that keeps most of them."""
    rule, count = max(report["dropped"].items(), key=lambda item: item[1], default=(None, 0))
    if 2 * count <= report["rows_in"]:
        return None
    guess = {}
    for name in (f for f in FIELDS if f not in found["columns"]):
        matches = [c for c in found["columns"] if name in c.lower() and c not in guess.values()]
        if len(matches) == 1:
            guess[name] = matches[0]
    trials = [
        (fmt, columns)
        for fmt in CONVERTERS
        for columns in ({**options.columns}, {**options.columns, **guess})
    ]
    rows = sample[:SAMPLE_FIT]
    kept = {
        (fmt, json.dumps(columns)): sum(
            _keeps(row, dataclasses.replace(options, format=fmt, columns=columns, keep_columns=[]))
            for row in rows
        )
        for fmt, columns in trials
    }
    (fmt, columns), best = max(kept.items(), key=lambda item: item[1])
    return {
        "rule": rule,
        "rows": count,
        "looked_for": report["examples"][rule][0]["detail"],
        **{k: v for k, v in found.items() if k != "roles"},
        "fits_best": {"format": fmt, "columns": json.loads(columns), "kept": best, "of": len(rows)}
        if best
        else None,
    }


def describe(diagnosis: dict) -> str:
    """The diagnosis in a few lines, ending with the command-line options that would fit."""
    lines = [
        f"{diagnosis['rows']} rows dropped for {diagnosis['rule']}, e.g. {diagnosis['looked_for']}",
        f"columns in the first rows: {', '.join(diagnosis['columns']) or 'none'}",
    ]
    if diagnosis["message keys"]:
        lines.append(f"keys of their messages: {', '.join(diagnosis['message keys'])}")
    fit = diagnosis["fits_best"]
    if fit:
        mapping = ",".join(f"{ours}={theirs}" for ours, theirs in fit["columns"].items())
        flags = fit["format"] + (f" --columns {mapping}" if mapping else "")
        lines.append(f"fits best: {flags} (keeps {fit['kept']} of the first {fit['of']} rows)")
    else:
        lines.append(
            "no format fits the first rows: map the columns (--columns) and the messages' keys "
            "(--role-key, --content-key, --roles, --text-key)"
        )
    return "\n".join(lines)


def _examples(converted: Dataset, rule: str, indices: list[int], first_of: dict[int, int]) -> list[dict]:
    """The first offending rows of a rule: row number (from 1: a .jsonl line number), what is wrong, an excerpt."""
    examples = []
    for index in indices:
        row = converted[index]
        if rule == "duplicate":
            detail, excerpt = (
                f"repeats row {first_of[index] + 1}",
                json.dumps(row["prompt"], ensure_ascii=False)[:160],
            )
        else:
            detail, excerpt = row["_detail"] or RULES[rule], row["_excerpt"]
        examples.append({"row": index + 1, "detail": detail, "excerpt": excerpt})
    return examples


def summary_line(report: dict) -> str:
    dropped = ", ".join(f"{rule}={n}" for rule, n in report["dropped"].items()) or "none"
    return f"kept {report['rows_out']} of {report['rows_in']} rows (dropped: {dropped})"
