"""Read preference data from wherever users keep it; write files atomically."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def read(path: str, split: str = "train", subset: str | None = None) -> Dataset:
    """A .json array, .jsonl or .parquet file, a folder saved by `datasets`, or a hub dataset id.

    Files are memory-mapped through Arrow by `datasets`, never held as Python objects.
    """
    local = Path(path)
    if local.suffix in FILE_BUILDERS:
        if not local.is_file():
            raise FileNotFoundError(f"dataset file not found: {path}")
        return load_dataset(FILE_BUILDERS[local.suffix], data_files=str(local), split="train")
    if local.is_dir():
        loaded = load_from_disk(str(local))
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise KeyError(f"{path} has splits {list(loaded)}, not {split!r}")
            return loaded[split]
        return loaded
    if local.suffix or path.startswith((".", "/")):
        raise FileNotFoundError(f"dataset not found: {path} (expected .json, .jsonl, .parquet or a folder)")
    return load_dataset(path, subset, split=split)  # subset: the hub dataset's config name


@contextmanager
def atomic_path(target: Path, existing: str = "replace"):
    """Yield a temporary path beside `target`, moved to `target` only if the block succeeds: nobody sees
    a partial file or folder. A folder already at `target` is replaced, or (`keep`: another process
    built the same one first) kept; `refuse` raises OSError rather than touch it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name
    try:
        yield tmp
        if existing == "replace" and target.is_dir() and tmp.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)  # onto a folder that is not empty: OSError
    except OSError:
        if existing != "keep" or not target.exists():
            raise
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write(dataset: Dataset, target: Path) -> None:
    """Write by suffix: .jsonl, .parquet, or (no suffix) a folder saved by `datasets`."""
    target = Path(target)
    with atomic_path(target) as tmp:
        if target.suffix == ".jsonl":
            dataset.to_json(str(tmp), lines=True, force_ascii=False)
        elif target.suffix == ".parquet":
            dataset.to_parquet(str(tmp))
        elif not target.suffix:
            dataset.save_to_disk(str(tmp))
        else:
            raise ValueError(f"output must end in .jsonl or .parquet, or be a folder: {target}")
