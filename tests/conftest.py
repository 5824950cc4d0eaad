import os

import pytest
import torch

from dpo_recipes import config


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """Build the tiny model once per session, away from the user's cache; subprocesses inherit it."""
    os.environ.setdefault("DPO_RECIPES_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("WANDB_MODE", "offline")  # tests never reach the network


@pytest.fixture(autouse=True)
def default_tier_loads_no_weights(request, monkeypatch):
    """The default tier (neither slow nor e2e) runs without model weights: a test there that loads some
    fails, naming the marker it needs."""
    if request.node.get_closest_marker("slow") or request.node.get_closest_marker("e2e"):
        return
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} loads model weights: mark it slow (or e2e)")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def pytest_collection_modifyitems(items):
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def run(tmp_path, overrides):
    """Train into tmp_path/run; returns the trainer and the run's dpo_metrics/."""
    from dpo_recipes import train

    cfg, recipe = config.compose(overrides)
    trainer = train.run(cfg, tmp_path / "run", recipe)
    return trainer, tmp_path / "run" / "dpo_metrics"


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The default recipe exactly as `make train` runs it: trained once, read by several test files."""
    return run(tmp_path_factory.mktemp("default"), [])


def tiny_overrides(recipe: str, *extra: str) -> list[str]:
    """The real recipe on the tiny offline Llama, as a user smoke-tests one (+smoke=tiny_llama): 32
    training rows, 16 eval rows, 2 steps."""
    return [
        f"recipes={recipe}",
        "+smoke=tiny_llama",
        "dataset.max_samples=32",
        "dataset.max_eval_samples=16",
        "++train.max_steps=2",
        "++train.logging_steps=1",
        "++train.eval_steps=2",
        "++train.disable_tqdm=true",
        *extra,
    ]
