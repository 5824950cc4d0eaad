"""The composed config read once into a `View`: each of our nodes typed by its dataclass, `train:` and
`model:` as dicts checked against TRL's own. Every rule reads a View, so a rule can be tested on a view
built by hand."""

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpo_recipes.config.schema import (
    CONF_DIR,
    OURS,
    DatasetSchema,
    HardwareSchema,
    JudgeSchema,
    LoggerSchema,
    ReferenceSchema,
    RoundsSchema,
    RunSchema,
)


@dataclass(frozen=True)
class View:
    """The composed config read once; rules read nothing else."""

    # node -> its dict as given: train resolved (loss_type a list), model unresolved, ours resolved
    nodes: dict
    task: str  # dpo, or reward (TASKS)
    dataset: DatasetSchema  # ours, typed (keys the generic pass refuses left out)
    hardware: HardwareSchema
    reference: ReferenceSchema
    judge: JudgeSchema
    rounds: RoundsSchema
    run: RunSchema
    logger: LoggerSchema
    choices: dict  # the option each group took, for messages: {"hardware": "zero3", ...}
    shipped: dict  # the dataset option's own file, to tell its eval data from the user's
    raw: dict  # the whole config unresolved, as the run saves it

    @property
    def train(self) -> dict:
        return self.nodes["train"]

    @property
    def model(self) -> dict:
        return self.nodes["model"]

    @property
    def losses(self) -> list:
        return self.train.get("loss_type", ["sigmoid"])

    @property
    def lora(self) -> bool:
        return bool(self.model.get("use_peft"))

    @property
    def sources(self) -> list:
        return self.nodes["dataset"].get("sources") or []


def _typed(cls, values: dict):
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def _shipped(option: Path) -> dict:
    """The data a dataset option names itself; a key that resolves only in a whole config is left out."""
    loaded, found = OmegaConf.load(option) if option.is_file() else {}, {}
    for key in ("path", "eval_path", "eval_split") if loaded else ():
        with contextlib.suppress(OmegaConfBaseException):
            found[key] = OmegaConf.select(loaded, key)
    return found


def read(cfg: DictConfig) -> View:
    """`cfg` resolved once into a View. The model node stays unresolved: its paths resolve when built."""
    train = OmegaConf.to_container(cfg.train, resolve=True, throw_on_missing=False)
    if cfg.get("task", "dpo") == "dpo" and isinstance(train.get("loss_type"), str):
        train["loss_type"] = [train["loss_type"]]  # `loss_type: robust` is DPOConfig's `[robust]`
    nodes = {"train": train, "model": OmegaConf.to_container(cfg.model, resolve=False)}
    nodes |= {name: OmegaConf.to_container(cfg[name], resolve=True, throw_on_missing=False) for name in OURS}
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    shipped = _shipped(CONF_DIR / "dataset" / f"{choices.get('dataset')}.yaml")
    typed = {name: _typed(cls, nodes[name]) for name, cls in OURS.items() if name != "sweep_report"}
    task = cfg.get("task", "dpo")
    return View(nodes, task, **typed, choices=choices, shipped=shipped, raw=OmegaConf.to_container(cfg))


def on_gpu(device: str, train: dict) -> bool:
    """Whether a run trains on a CUDA GPU: its hardware option says so, or it asks for half precision."""
    return device == "cuda" or bool(train.get("bf16") or train.get("fp16"))
