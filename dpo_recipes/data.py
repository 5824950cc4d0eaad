"""Load the dataset a `dataset:` option names and split off the eval set."""

from datasets import Dataset
from omegaconf import DictConfig

from data_prep import io


def _head(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def load(cfg: DictConfig, seed: int = 42) -> tuple[Dataset, Dataset | None]:
    """Return (train, eval) in TRL's prompt/chosen/rejected form; eval is None when there is none."""
    train = io.read(cfg.path, cfg.train_split)
    if cfg.eval_path:
        evaluation = io.read(cfg.eval_path, cfg.eval_split or "train")
    elif cfg.eval_split:
        evaluation = io.read(cfg.path, cfg.eval_split)
    elif cfg.eval_size:
        size = int(cfg.eval_size) if cfg.eval_size >= 1 else cfg.eval_size
        parts = train.train_test_split(test_size=size, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = None
    train = _head(train, cfg.max_samples)
    if evaluation is not None:
        evaluation = _head(evaluation, cfg.max_eval_samples)
    return train, evaluation
