"""Compose the Hydra groups and build TRL's objects from them, failing early with every error at once.

`train:` keys are `trl.DPOConfig` fields and `model:` keys are `trl.ModelConfig` fields: both are checked
against the dataclasses themselves, so nothing here lists TRL's fields by hand. Our own nodes
(`dataset`, `hardware`, `reference`, `run`, `sweep_report`) are typed by the dataclasses below and
checked the same way, rather than by Hydra at compose time, which stops at the first error: every
unknown key, wrong type and impossible combination is reported together.
"""

import dataclasses
import difflib
import importlib.util
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from peft import PeftConfig
from transformers import BitsAndBytesConfig
from trl import DPOConfig, ModelConfig, get_peft_config, get_quantization_config

from data_prep.convert import FORMATS, Messages
from dpo_recipes import ROOT, assets, hub, reference, rundir, tiny

CONF_DIR = ROOT / "conf"
RECIPES_DIR = ROOT / "recipes"
TEMPLATES_DIR = ROOT / "assets" / "chat_templates"
SET_BY_US = {"output_dir"}  # DPOConfig fields the run sets itself
# DPOConfig fields the Trainer ignores (scripts read them): every run trains, and evaluates with eval data.
IGNORED_BY_TRAINER = {"do_train", "do_eval", "do_predict"}


@dataclass
class ModelArgs(ModelConfig):
    """trl.ModelConfig and the one model key TRL lacks."""

    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "for a tokenizer without one: a template in assets/chat_templates/ or a .jinja file"
        },
    )


# Our own nodes. A Literal type lists a key's choices once: check() refuses any other value with them.
@dataclass
class DatasetSchema:
    path: str | None = None  # a .json/.jsonl/.parquet file, a folder saved by `datasets`, or a hub id
    format: Literal[FORMATS] = "trl"  # the data_prep converter
    train_split: str = "train"  # split to read from a hub id or a saved DatasetDict
    subset: str | None = None  # a hub dataset's config name
    eval_path: str | None = None  # a separate eval file, if any
    eval_split: str | None = None  # an eval split of the same dataset, if any
    eval_size: float = 0.0  # with neither: hold out this fraction (<1) or count (>=1) of train
    max_samples: int | None = None  # keep the first N training rows
    max_eval_samples: int | None = None
    columns: dict[str, str] = field(default_factory=dict)  # our field -> the input's column (--columns)
    messages: dict[str, Any] = field(default_factory=dict)  # role_key, content_key, roles, text_key
    sources: list[dict[str, Any]] = field(default_factory=list)  # instead of path: several, mixed


@dataclass
class SourceSchema:
    """One source of a mix (`dataset.sources`), converted by its own rules."""

    path: str = MISSING
    format: Literal[FORMATS] = "trl"
    split: str = "train"
    subset: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    messages: dict[str, Any] = field(default_factory=dict)
    fraction: float | None = None  # of the source's converted rows, drawn with the seed
    max_samples: int | None = None  # the first N rows read


@dataclass
class HardwareSchema:
    device: Literal["cpu", "cuda"] = "cpu"  # what the option needs to train
    engine: Literal["single", "ddp", "deepspeed", "fsdp"] = "single"  # all but single: accelerate launch
    accelerate_config: str | None = None  # the accelerate config file `make train NPROC=...` launches with
    zero_stage: int | None = None  # DeepSpeed's ZeRO stage, on the options that use it


@dataclass
class LoggerSchema:
    name: Literal["none", "wandb", "tensorboard"] = "none"  # train.report_to is set by the same option
    project: str | None = None  # wandb project
    entity: str | None = None  # wandb entity (team or user)
    mode: Literal["online", "offline", "disabled"] = "online"  # wandb's


@dataclass
class ReferenceSchema:
    strategy: Literal[("auto", *reference.STRATEGIES)] = "auto"  # a row of dpo_recipes/reference.py
    path: str | None = None  # `path`: the reference model; `sft_adapter`: the SFT LoRA adapter


@dataclass
class RunSchema:
    name: str | None = None  # a stable run dir, outputs/<recipe>/<name>; default: the launch time
    resume: str = "auto"  # auto (newest complete checkpoint in the run dir) | never | a checkpoint dir
    overwrite: bool = False  # replace a finished run in the same dir
    allow_changes: bool = False  # resume an unfinished run with overrides that change what it trains
    nan_patience: int = 0  # logged steps with a non-finite loss or grad norm tolerated before stopping


@dataclass
class SweepReportSchema:
    metric: str = "eval_rewards/accuracies"  # the job with the best final value is picked
    higher_is_better: bool = True
    tie_break: str = "eval_loss"  # lowest final value wins a tie


LABEL_SMOOTHING_LOSSES = {"robust", "exo_pair"}  # the only TRL 1.16 losses that read label_smoothing


OURS = {
    "dataset": DatasetSchema,
    "hardware": HardwareSchema,
    "reference": ReferenceSchema,
    "run": RunSchema,
    "sweep_report": SweepReportSchema,
    "logger": LoggerSchema,
}


# The primary config's schema: TRL's nodes as open dicts (check() reads them against TRL's dataclasses),
# ours with their defaults.
Schema = dataclasses.make_dataclass(
    "Schema",
    [(name, dict[str, Any], field(default_factory=dict)) for name in ("model", "train")]
    + [
        (name, dict[str, Any], field(default_factory=lambda cls=cls: dataclasses.asdict(cls())))
        for name, cls in OURS.items()
    ],
)


ConfigStore.instance().store(name="schema", node=Schema)
OmegaConf.register_new_resolver("dpo_root", lambda sub="": str(ROOT / sub), replace=True)
OmegaConf.register_new_resolver("tiny_model", lambda: str(tiny.path()), replace=True)
OmegaConf.register_new_resolver("dpo_record", rundir.record_of, replace=True)
OmegaConf.register_new_resolver("tiny_qwen", lambda: str(tiny.qwen_path()), replace=True)
OmegaConf.register_new_resolver("asset", lambda relative: str(assets.unpacked(relative)), replace=True)
OmegaConf.register_new_resolver(
    "dpo_first", lambda *values: next((v for v in values if v), None), replace=True
)
# Job dir names without the `++` that plain_keys() adds.
OmegaConf.register_new_resolver("dpo_dirname", lambda name: re.sub(r"(^|,)\+\+", r"\1", name), replace=True)

# `train.max_steps=4` must work whether or not the recipe happens to set that key. Hydra refuses a plain
# override of a key the config lacks, naming only the first; as `++` (add or replace) every such key
# reaches check(), which reports all unknown ones at once, with suggestions.
PLAIN_KEY = re.compile(rf"^(?:{'|'.join(f.name for f in dataclasses.fields(Schema))})\.[\w.]+=")


def plain_keys(overrides: list[str]) -> list[str]:
    return [f"++{o}" if PLAIN_KEY.match(o) else o for o in overrides]


class ConfigError(ValueError):
    """Every problem found in a composed config, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Built:
    """Everything a run needs, read from the composed config once; nothing after build() reads that."""

    args: DPOConfig
    model: ModelArgs
    peft: PeftConfig | None
    quantization: BitsAndBytesConfig | None
    dataset: DatasetSchema
    hardware: HardwareSchema
    reference: ReferenceSchema  # its strategy resolved: never auto
    run: RunSchema
    logger: LoggerSchema


def recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def compose(overrides: list[str] = ()) -> tuple[DictConfig, str]:
    """Compose like `python -m dpo_recipes.train` would; returns the config and the recipe name."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=plain_keys(overrides), return_hydra_config=True)
    recipe = cfg.hydra.runtime.choices.recipes
    HydraConfig.instance().set_config(cfg)  # option names for messages, as under dpo_recipes.train
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, recipe


def chat_template(name_or_path: str) -> str:
    """The text of a template shipped in assets/chat_templates/ (by name) or of a .jinja file."""
    shipped = {p.stem: p for p in TEMPLATES_DIR.glob("*.jinja")}
    path = shipped.get(name_or_path) or Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a template shipped here ({', '.join(sorted(shipped))}) nor a .jinja file"
        )
    return path.read_text()


def loss_types() -> set[str]:
    """The loss names TRL accepts, read from DPOConfig's own field help (TRL checks only at the first step)."""
    help_text = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata["help"]
    return set(re.findall(r"`'(\w+)'`", help_text))


def _unknown_keys(node: str, keys, cls) -> list[str]:
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    problems = []
    for key in keys:
        if key in SET_BY_US and node == "train":
            problems.append(f"{node}.{key}: set by the run itself (the run dir); remove it")
        elif node == "train" and key in IGNORED_BY_TRAINER:
            problems.append(
                f"{node}.{key}: the Trainer ignores it: every run trains, and evaluates when the dataset "
                "has eval data (dataset.eval_path, eval_split or eval_size); remove it"
            )
        elif key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            trl_class = {"train": "DPOConfig", "model": "ModelConfig"}.get(node)
            what = f"not a {trl_class} field" if trl_class else f"unknown {node} key"
            problems.append(f"{node}.{key}: {what}{hint}")
    return problems


SPELLING = {f.name for f in dataclasses.fields(Messages)}  # the keys of dataset.messages


def _choice(group: str, default: str | None = None) -> str | None:
    """The option the config took for `group`, for messages; `default` outside a Hydra compose."""
    return HydraConfig.get().runtime.choices.get(group, default) if HydraConfig.initialized() else default


def _dataset_problems(dataset: DictConfig, sources: list) -> list[str]:
    problems = []
    if not dataset.path and not sources:
        problems.append(
            "dataset.path: missing; name a file, a saved dataset folder or a hub id (or dataset.sources)"
        )
    if dataset.path and sources:
        problems.append("dataset: set path (one source) or sources (a mix), not both")
    for i, source in enumerate(sources):
        node = f"dataset.sources[{i}]"
        if not isinstance(source, dict) or not source.get("path"):
            problems.append(f"{node}: a source is a mapping with at least a path")
            continue
        problems += _unknown_keys(node, source, SourceSchema) + _wrong_types(node, source, SourceSchema)
        problems += [f"{node}.messages.{k}: unknown" for k in set(source.get("messages") or {}) - SPELLING]
        if source.get("fraction") is not None and not 0 < source["fraction"] <= 1:
            problems.append(f"{node}.fraction: a share of the source's rows, in (0, 1]")
    option = _choice("dataset")
    shipped = OmegaConf.load(CONF_DIR / "dataset" / f"{option}.yaml") if option else {}
    moved = shipped and (sources or dataset.path != shipped.get("path"))
    for key in ("eval_path", "eval_split"):  # an eval source of the option's own data, not of the new path
        if moved and dataset[key] and dataset[key] == shipped.get(key):
            data = "dataset.sources" if sources else f"dataset.path={dataset.path}"
            problems.append(
                f"dataset.{key}: {dataset[key]} belongs to dataset={option}, not to {data}; "
                f"name your eval data (dataset.{key}=...), or hold out part of yours: dataset.{key}=null "
                "dataset.eval_size=0.1 (a fraction, or a row count)"
            )
    if sources and dataset.eval_split:
        problems.append(
            "dataset.eval_split: a mix has no one split to take; use dataset.eval_path or eval_size"
        )
    for key in set(dataset.get("messages") or {}) - SPELLING:
        problems.append(f"dataset.messages.{key}: unknown; the keys are {', '.join(sorted(SPELLING))}")
    if dataset.eval_path and dataset.eval_split:
        problems.append("dataset: set eval_path (a separate file) or eval_split (a split of path), not both")
    if isinstance(dataset.eval_size, int | float) and dataset.eval_size < 0:
        problems.append("dataset.eval_size: must be a fraction (< 1) or a row count (>= 1)")
    return problems


SECRET = re.compile(r"token|secret|password|api_key", re.I)


def _scale_problems(cfg: DictConfig, train: dict, model: dict) -> list[str]:
    """Distributed engines and secrets: what would otherwise fail minutes into a launch."""
    engine, problems = cfg.hardware.engine, []
    option = _choice("hardware", engine)
    if engine in ("deepspeed", "fsdp") and train.get("use_cpu"):
        problems.append(
            f"hardware={option} shards on GPUs only: with train.use_cpu accelerate would run plain data "
            "parallel instead; on CPU use hardware=cpu NPROC=<processes>"
        )
    zero3 = cfg.hardware.zero_stage == 3
    reentrant = (train.get("activation_checkpointing_kwargs") or {}).get("use_reentrant")
    if zero3 and model.get("use_peft") and train.get("activation_checkpointing") and reentrant is False:
        problems.append(
            "ZeRO-3 with LoRA and gradient checkpointing needs use_reentrant=true (TRL issue 2514)"
        )
    for key, value in train.items():
        if SECRET.search(key) and value:
            problems.append(
                f"train.{key}: secrets go in the environment (e.g. HF_TOKEN), not in a config saved with the run"
            )
    return problems


def _machine_problems(cfg: DictConfig, train: dict) -> list[str]:
    """What this machine and launch lack for the run: extras, GPUs, processes, a wandb login."""
    engine, logger, problems = cfg.hardware.engine, cfg.logger, []
    option = _choice("hardware", engine)
    if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append(f'hardware={option} needs DeepSpeed: pip install -e ".[deepspeed]"')
    wants_gpu = cfg.hardware.device == "cuda" or train.get("bf16") or train.get("fp16")
    if wants_gpu and not train.get("use_cpu") and not torch.cuda.is_available():
        problems.append(
            "hardware: this recipe trains on a CUDA GPU (bf16) and none is visible here; "
            "to run it on this machine add the override hardware=cpu"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if engine != "single" and world == 1:
        problems.append(
            f"hardware={option} runs through accelerate: make train HARDWARE={option} NPROC=<processes>"
        )
    if engine == "single" and world == 1 and torch.cuda.device_count() > 1 and not train.get("use_cpu"):
        problems.append(
            f"{torch.cuda.device_count()} GPUs are visible to one process: launch with HARDWARE=ddp NPROC=<gpus>, "
            "or make one visible with CUDA_VISIBLE_DEVICES=0"
        )
    if world > 1 and not cfg.run.name and not os.environ.get("DPO_RUN_STAMP"):
        problems.append(
            "several processes need one run dir: set RUN=<name> (or DPO_RUN_STAMP, as make train does)"
        )
    if logger.name == "wandb" and logger.mode == "online" and not _wandb_logged_in():
        problems.append(
            "logger=wandb: not logged in; run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline"
        )
    return problems


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())


SIMPLE = (bool, int, float, str, type(None))


def _wrong_types(node: str, values: dict, cls) -> list[str]:
    """Values whose type a plain field (bool, int, float, str, or a union of them) cannot take, and
    values a Literal field does not list."""
    hints, problems = typing.get_type_hints(cls), []
    for key, value in values.items():
        hint = hints.get(key)
        if typing.get_origin(hint) is Literal:
            if value not in typing.get_args(hint):
                choices = ", ".join(map(str, typing.get_args(hint)))
                problems.append(f"{node}.{key}: unknown {value!r}; choose one of {choices}")
            continue
        allowed = (
            typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        )
        if key not in hints or not all(t in SIMPLE for t in allowed) or value == "???":
            continue
        ok = any(
            (isinstance(value, t) and not (isinstance(value, bool) and t in (int, float)))
            or (t is float and isinstance(value, int) and not isinstance(value, bool))
            for t in allowed
        )
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            problems.append(f"{node}.{key}: expected {names}, got {value!r}")
    return problems


def _train(cfg: DictConfig) -> dict:
    """The `train:` node as DPOConfig will get it; `loss_type: robust` is TRL's `[robust]`."""
    train = OmegaConf.to_container(cfg.train, resolve=True, throw_on_missing=False)
    if isinstance(train.get("loss_type"), str):
        train["loss_type"] = [train["loss_type"]]
    return train


def check(cfg: DictConfig, *, machine: bool = True) -> None:
    """Raise ConfigError listing every problem that can be seen without loading weights: in the config
    itself, and (`machine`) on this machine and launch."""
    train = _train(cfg)
    model = OmegaConf.to_container(cfg.model, resolve=False)
    problems = _unknown_keys("train", train, DPOConfig) + _unknown_keys("model", model, ModelArgs)
    problems += _wrong_types("train", train, DPOConfig) + _wrong_types("model", model, ModelArgs)
    if model.get("chat_template"):
        try:
            chat_template(model["chat_template"])
        except FileNotFoundError as err:
            problems.append(f"model.chat_template: {err}")
    for node, cls in OURS.items():
        values = OmegaConf.to_container(cfg[node], resolve=True, throw_on_missing=False)
        problems += _unknown_keys(node, values, cls) + _wrong_types(node, values, cls)
    sources = OmegaConf.to_container(cfg.dataset.sources, resolve=True) or []
    problems += _dataset_problems(cfg.dataset, sources) + _scale_problems(cfg, train, model)
    resume = cfg.run.resume
    if resume not in ("auto", "never") and not (Path(str(resume)) / "trainer_state.json").is_file():
        problems.append(
            f"run.resume: {resume!r} is not auto, never or a checkpoint dir with trainer_state.json"
        )
    losses = train.get("loss_type", ["sigmoid"])
    known_losses = loss_types()
    for loss in losses:
        if loss not in known_losses:
            close = difflib.get_close_matches(str(loss), known_losses, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                f"train.loss_type: unknown loss {loss!r}; {hint}TRL has {', '.join(sorted(known_losses))}"
            )
    weights = train.get("loss_weights")
    if weights is not None and len(weights) != len(losses):
        problems.append(
            f"train.loss_weights: {len(weights)} weights for {len(losses)} loss {losses}; switch losses "
            f"with loss=<option>, which sets both (loss={losses[0]}), or set both keys"
        )
    path = None if OmegaConf.is_missing(cfg.reference, "path") else cfg.reference.path
    strategy = reference.resolve(cfg.reference.strategy, bool(model.get("use_peft")))
    if strategy in reference.STRATEGIES:  # an unknown one is reported with the choices above
        problems += reference.problems(strategy, path, train, bool(model.get("use_peft")))
    paths = {"model.model_name_or_path": model.get("model_name_or_path"), "reference.path": path}
    paths |= {f"dataset.{k}": cfg.dataset.get(k) for k in ("path", "eval_path")}
    paths |= {
        f"dataset.sources[{i}].path": s.get("path") for i, s in enumerate(sources) if isinstance(s, dict)
    }
    problems += [p for key, value in paths.items() if value and (p := hub.missing_local(str(value), key))]
    if train.get("label_smoothing") and not set(losses) & LABEL_SMOOTHING_LOSSES:
        problems.append(
            f"train.label_smoothing: ignored by loss {losses} (TRL 1.16 reads it only in robust and exo_pair; "
            "the label-smoothed sigmoid of cDPO is gone); use loss=robust for noisy labels, or remove it"
        )
    targets = model.get("lora_target_modules") or []
    if model.get("use_peft") and "lm_head" in ([targets] if isinstance(targets, str) else targets):
        problems.append(
            "model.lora_target_modules: lm_head: TRL's fused log-prob head reads the base weight and "
            "ignores an adapter there; remove it (all-linear leaves lm_head out)"
        )
    if machine:
        problems += _machine_problems(cfg, train)
    if problems:
        raise ConfigError(problems)


def build(cfg: DictConfig, output_dir: Path, recipe: str | None = None, *, machine: bool = True) -> Built:
    """Check `cfg`, then build DPOConfig, ModelConfig, the PEFT and quantization configs and our own nodes
    (no weights). The run is named `<recipe>/<run dir>`; a dataset without eval data turns eval off."""
    check(cfg, machine=machine)
    train = _train(cfg)
    nodes = {name: cls(**OmegaConf.to_container(cfg[name], resolve=True)) for name, cls in OURS.items()}
    strategy = reference.resolve(nodes["reference"].strategy, bool(cfg.model.get("use_peft")))
    nodes["reference"] = dataclasses.replace(nodes["reference"], strategy=strategy)
    model_args = ModelArgs(**OmegaConf.to_container(cfg.model, resolve=True))
    dataset = nodes["dataset"]
    if not (dataset.eval_path or dataset.eval_split or dataset.eval_size):
        train["eval_strategy"] = "no"
    if recipe:
        train["run_name"] = f"{recipe}/{Path(output_dir).name}"
    train["model_init_kwargs"] = {
        "use_safetensors": True,  # pickled weights can run code on load; opt in with model_init_kwargs
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(train.get("model_init_kwargs") or {}),
    }
    try:
        args = DPOConfig(output_dir=str(output_dir), **train)  # raises on bf16 without a GPU
    except (ValueError, TypeError) as err:
        raise ConfigError([f"train: {err}"]) from err
    nodes.pop("sweep_report")
    return Built(args, model_args, get_peft_config(model_args), get_quantization_config(model_args), **nodes)
