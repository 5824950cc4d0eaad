"""Run DPO from a recipe: Hydra config groups composed into TRL's DPOTrainer."""

import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The project folder: holds conf/, recipes/ and the bundled toy data."""

# bitsandbytes warns on every CPU import that an optional 4-bit CPU kernel is missing; 4-bit training
# runs on CUDA, so the notice only confuses CPU users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
