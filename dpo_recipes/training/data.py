"""Load the dataset a `dataset:` option names, convert it with data_prep's converters, split off eval."""

import json
from collections import Counter

import numpy as np
from datasets import Dataset, concatenate_datasets
from datasets.exceptions import DatasetGenerationError
from pyarrow import ArrowException

from data_prep.convert import Messages
from data_prep.pipeline import Options, convert, describe, summary_line
from data_prep.reading import read
from data_prep.unpaired import unpair
from dpo_recipes import errors
from dpo_recipes.config.schema import DatasetSchema, SourceSchema
from dpo_recipes.errors import DataError
from dpo_recipes.sources import hub


def counts_line(counts: dict) -> str:
    """A split's row counts in words: `289 read, 289 kept by conversion, 136 kept by TRL`."""
    numbers = {k: v for k, v in counts.items() if isinstance(v, int) and (v or k != "rows_held_out_for_eval")}
    return ", ".join(
        f"{v} {k.removeprefix('rows_').replace('_', ' ').replace('trl', 'TRL')}" for k, v in numbers.items()
    )


def _head(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def split_by_prompt(rows: Dataset, size: float | int, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held out): `size` of the distinct prompts (a fraction or a count) held out with every row
    that has them, so no prompt is on both sides. Where every prompt is distinct this is datasets' own
    `train_test_split` of the rows, row for row."""
    keys = [json.dumps(prompt, sort_keys=True) for prompt in rows["prompt"]]
    rows_of: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        rows_of.setdefault(key, []).append(i)
    prompts = Dataset.from_dict({"key": list(rows_of)}).train_test_split(test_size=size, seed=seed)
    side = {name: [i for key in prompts[name]["key"] for i in rows_of[key]] for name in ("train", "test")}
    return rows.select(side["train"]), rows.select(side["test"])


def _convert(
    path: str, split: str, limit: int | None, rules, name: str, num_proc, key: str, style: str
) -> tuple:
    """Read and convert one source by its `rules` (format, columns, messages, subset) in `style`; `key`
    names it in messages."""
    try:
        with hub.fetching("dataset", path, key):
            raw = read(path, split, rules.subset)
        spelled = Messages(**rules.messages)
        options = Options(rules.format, style, rules.columns, messages=spelled, num_proc=num_proc)
        rows, report = convert(_head(raw, limit), options, name)
    except errors.Unreachable:
        raise
    except (OSError, ValueError, KeyError, ArrowException, DatasetGenerationError) as err:
        raise DataError(f"{path}: cannot read the {name} data: {err}") from err
    if not report["rows_out"]:
        examples = "; ".join(
            f"row {e['row']}: {rule}: {e['detail']}"
            for rule, ex in report["examples"].items()
            for e in ex[:2]
        )
        diagnosis = f"\n{describe(report['diagnosis'])}" if report["diagnosis"] else ""
        raise DataError(
            f"{path}: no usable {name} rows as format {rules.format!r}: {summary_line(report)}. {examples}{diagnosis}"
        )
    return rows, report


def _mix(cfg: DatasetSchema, seed: int, num_proc) -> tuple[Dataset, dict]:
    """`dataset.sources`: each converted by its own rules, a seeded share of each (`fraction`), one after
    the other (the trainer's seeded sampler interleaves them). Index mappings only: no second pass."""
    parts, reports = [], []
    for i, source in enumerate(SourceSchema(**s) for s in cfg.sources):
        key = f"dataset.sources[{i}].path"
        rows, report = _convert(
            source.path, source.split, source.max_samples, source, f"train ({key})", num_proc, key, cfg.style
        )
        rows = rows.select_columns(Options(source.format).written)  # what the converter writes
        if source.fraction is not None:  # a seeded draw, kept in file order
            drawn = np.random.default_rng(seed).choice(
                len(rows), max(1, round(source.fraction * len(rows))), replace=False
            )
            rows = rows.select(np.sort(drawn))
        parts.append(rows)
        reports.append({"path": source.path, "format": source.format, **report, "rows_mixed": len(rows)})
    if len({tuple(part.column_names) for part in parts}) > 1:
        raise DataError(
            "the sources of the mix are not all paired or all unpaired rows: convert the pairs with "
            "`make prep ... ARGS=--unpaired` and mix them as format thumbs"
        )
    styles = {r["path"]: r["style"] for r in reports}
    if len(set(styles.values())) > 1:
        raise DataError(
            f"the sources of the mix come in different styles ({styles}): set dataset.style=conversational "
            "or standard to convert them all one way"
        )
    total = {key: sum(r[key] for r in reports) for key in ("rows_in", "rows_out", "rows_mixed")}
    total["dropped"] = dict(sum((Counter(r["dropped"]) for r in reports), Counter()))
    total["sources"], total["style"] = reports, reports[0]["style"]
    print(
        f"mixed {total['rows_mixed']} rows from {len(parts)} sources: "
        + ", ".join(f"{r['rows_mixed']} of {r['path']}" for r in reports)
    )
    return concatenate_datasets(parts), total  # the trainer's seeded sampler interleaves them


def completions(rows: Dataset | None) -> Dataset | None:
    """Pairs as TRL's prompt-completion rows for supervised fine-tuning: each prompt with its chosen
    answer; of thumbs rows, those rated up."""
    if rows is None:
        return None
    if "label" in rows.column_names:
        return rows.filter(lambda up: up, input_columns="label").remove_columns("label")
    return rows.remove_columns("rejected").rename_column("chosen", "completion")


def unpaired(sets: tuple, reports: dict, seed: int) -> tuple:
    """dataset.unpair: each split's pairs as unpaired rows (data_prep.unpaired.unpair), counted."""
    out = []
    for name, rows in zip(("train", "eval"), sets, strict=True):
        if rows is not None:
            pairs, (rows, repeats) = len(rows), unpair(rows, seed)
            reports[name].update(
                pairs_unpaired=pairs, rows_unpaired=len(rows), unpaired_repeats_dropped=repeats
            )
            print(
                f"{name} data: {pairs} pairs unpaired into {len(rows)} rows ({repeats} repeated rows dropped)"
            )
        out.append(rows)
    return tuple(out)


def load(
    cfg: DatasetSchema, seed: int = 42, num_proc: int | None = None
) -> tuple[Dataset, Dataset | None, dict]:
    """Return (train, eval, report) in TRL's prompt/chosen/rejected form, or its unpaired
    prompt/completion/label form (formats thumbs and instruction, dataset.unpair); eval is None when there
    is none."""
    if cfg.sources:
        train, report = _mix(cfg, seed, num_proc)
    else:
        train, report = _convert(
            cfg.path, cfg.train_split, cfg.max_samples, cfg, "train", num_proc, "dataset.path", cfg.style
        )
    reports = {"train": report}
    evaluation, source_name = None, cfg.path or "the mix"
    if cfg.eval_path or cfg.eval_split:
        path = cfg.eval_path or cfg.path
        split = cfg.eval_split or "train"
        evaluation, reports["eval"] = _convert(  # in the style the training rows took
            path, split, cfg.max_eval_samples, cfg, "eval", num_proc, "dataset.eval_path", report["style"]
        )
        reports["eval"]["source"] = f"{path}, split {split}"
    elif cfg.eval_size:
        size = int(cfg.eval_size) if cfg.eval_size >= 1 else cfg.eval_size
        train, held_out = split_by_prompt(train, size, seed)
        evaluation = _head(held_out, cfg.max_eval_samples)
        n, held = len(evaluation), len(held_out)
        source = f"{n} rows held out of {source_name}"
        if n < held:  # the cap leaves the training rows as they are: the rest are set aside, not trained on
            source = (
                f"{n} of the {held} rows held out of {source_name} (dataset.max_eval_samples={n}); "
                f"{held - n} set aside, neither trained on nor evaluated"
            )
        reports["eval"] = dict(
            rows_in=n, rows_out=n, held_out=held, dropped={}, held_out_from_train=True, source=source
        )
        print(f"eval data: {source}")
    if cfg.unpair:
        train, evaluation = unpaired((train, evaluation), reports, seed)
    return train, evaluation, reports
