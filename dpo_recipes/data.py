"""Load the dataset a `dataset:` option names, convert it with data_prep's converters, split off eval."""

from datasets import Dataset
from datasets.exceptions import DatasetGenerationError
from pyarrow import ArrowException

from data_prep.convert import Messages
from data_prep.pipeline import Options, convert, describe, read, summary_line
from dpo_recipes import hub
from dpo_recipes.config import DatasetSchema


class DataError(ValueError):
    """Unreadable data or no usable rows: the message says which file and why."""


def _head(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def _convert(path: str, split: str, limit: int | None, cfg: DatasetSchema, name: str, num_proc) -> tuple:
    try:
        with hub.fetching("dataset", path, "dataset.path" if name == "train" else "dataset.eval_path"):
            raw = read(path, split)
        options = Options(
            cfg.format, columns=cfg.columns, messages=Messages(**cfg.messages), num_proc=num_proc
        )
        rows, report = convert(_head(raw, limit), options, name)
    except hub.Unreachable:
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
            f"{path}: no usable {name} rows as format {cfg.format!r}: {summary_line(report)}. {examples}{diagnosis}"
        )
    return rows, report


def load(
    cfg: DatasetSchema, seed: int = 42, num_proc: int | None = None
) -> tuple[Dataset, Dataset | None, dict]:
    """Return (train, eval, report) in TRL's prompt/chosen/rejected form; eval is None when there is none."""
    train, report = _convert(cfg.path, cfg.train_split, cfg.max_samples, cfg, "train", num_proc)
    reports = {"train": report}
    evaluation = None
    if cfg.eval_path or cfg.eval_split:
        path = cfg.eval_path or cfg.path
        split = cfg.eval_split or "train"
        evaluation, reports["eval"] = _convert(path, split, cfg.max_eval_samples, cfg, "eval", num_proc)
        reports["eval"]["source"] = f"{path}, split {split}"
    elif cfg.eval_size:
        size = int(cfg.eval_size) if cfg.eval_size >= 1 else cfg.eval_size
        parts = train.train_test_split(test_size=size, seed=seed)
        train, evaluation = parts["train"], _head(parts["test"], cfg.max_eval_samples)
        n = len(evaluation)
        source = f"{n} rows held out of {cfg.path}"
        reports["eval"] = {
            "rows_in": n,
            "rows_out": n,
            "dropped": {},
            "held_out_from_train": True,
            "source": source,
        }
        print(f"eval data: {source}")
    return train, evaluation, reports
