import contextlib
import importlib.machinery
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import types
import warnings
from types import SimpleNamespace

import pytest
import torch

from dpo_recipes import config


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """Build the tiny models once per session, away from the user's cache; subprocesses inherit it (and
    test workers the controller's, see `pytest_configure`)."""
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


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Under pytest-xdist (`make test` runs a worker per core), each worker keeps to its own cores, and
    what it trains or launches takes its threads from those: workers never contend for a core. Before
    the workers start, the controller builds the tiny Llama, which almost every test file composes, on
    every core into a cache the workers share (else each worker would build its own, on one core)."""
    if (
        not os.environ.get("PYTEST_XDIST_WORKER")
        and config.option.numprocesses
        and not config.option.collectonly
    ):
        os.environ.setdefault("DPO_RECIPES_CACHE", str(config._tmp_path_factory.getbasetemp() / "cache"))
        from dpo_recipes.sources import tiny

        print(f"building the tiny Llama for the test workers in {os.environ['DPO_RECIPES_CACHE']}")
        tiny.path()
    worker, count = (
        os.environ.get("PYTEST_XDIST_WORKER"),
        int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")),
    )
    if worker and hasattr(os, "sched_setaffinity") and count <= len(cores := sorted(os.sched_getaffinity(0))):
        share = cores[int(worker.removeprefix("gw")) :: count]
        os.sched_setaffinity(0, share)
        os.environ["OMP_NUM_THREADS"] = str(len(share))
        torch.set_num_threads(len(share))


# The longest files, longest first (as `pytest --durations=0` times them): each worker takes the next
# file when it is free, so the longest start first and the workers finish together.
LONGEST = [
    "entry/test_scaleout.py",
    "after/test_rounds.py",
    "training/test_precision.py",
    "memory/test_memory.py",
    "after/test_after.py",
    "after/test_judge.py",
    "training/test_packing.py",
    "after/test_sweep.py",
    "entry/test_benchmarks.py",
    "training/test_qwen.py",
    "training/test_train.py",
    "training/test_losses.py",
    "config/test_hardware.py",
    "rundir/test_runs.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0].removeprefix("tests/"), len(LONGEST)))
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


# Each batch layout of trainer.packed as overrides; the tiny recipes ship with "both".
LAYOUT = {
    "padded": ["++train.padding_free=false", "++train.share_prompt=false"],
    "padding_free": ["++train.padding_free=true", "++train.share_prompt=false"],
    "share_prompt": ["++train.padding_free=false", "++train.share_prompt=true"],
    "both": ["++train.padding_free=true", "++train.share_prompt=true"],
}


def python_m(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args` run in this process, without a new interpreter's seconds of imports: its
    exit code and what it printed. What it changes of the process (argv, environment, signal handlers,
    the root logger Hydra configures) is put back."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = sys.argv, dict(os.environ), logging.root.handlers[:], logging.root.level
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = [module, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)  # imported: fine
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    finally:
        sys.argv, environ, logging.root.handlers[:], level = saved
        os.environ.clear()
        os.environ.update(environ)
        logging.root.setLevel(level)
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


class VLLM:
    """vLLM's LLM as rounds use it, for a machine without vLLM: what it was built with and asked; each
    answer the prompt's last three tokens and its first stop token."""

    built: dict = {}
    asked: list = []

    def __init__(self, **kwargs):
        VLLM.built = kwargs

    def generate(self, prompts, params):
        VLLM.asked = [prompts, params]
        stop = params["stop_token_ids"][0]
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=p["prompt_token_ids"][-3:] + [stop])])
                for p in prompts]  # fmt: skip


@pytest.fixture
def vllm(monkeypatch):
    """An installed `vllm` whose LLM is the stand-in above (SamplingParams: a dict of its arguments)."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = VLLM, dict
    monkeypatch.setitem(sys.modules, "vllm", module)
    return VLLM
