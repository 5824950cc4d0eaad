"""Run DPO from a recipe: Hydra config groups composed into TRL's DPOTrainer."""

import logging
import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
ROOT = _PACKAGE if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent
"""The project folder: holds conf/, recipes/, assets/, data/ and accelerate/. In a clone, the repository;
installed from a wheel, the package itself, where pyproject.toml maps those folders."""

# bitsandbytes warns on every CPU import that an optional 4-bit CPU kernel is missing; 4-bit training
# runs on CUDA, so the notice only confuses CPU users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# TRL warns on every import of trl.experimental (ORPO, CPO) that its API may change; the project pins
# TRL and tests what it uses of it, so the notice is noise in every run's console.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
