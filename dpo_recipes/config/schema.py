"""What a composed config may hold: our nodes' dataclasses, the Hydra glue (the ConfigStore schema, the
resolvers, the `++` rewrite) and the generic pass that reads any node against its dataclass.

`train:` keys are `trl.DPOConfig` fields (and `share_prompt`; under another `task`, the fields of its config: TASKS) and `model:` keys are `trl.ModelConfig` fields: both are read
against TRL's dataclasses themselves, so nothing here lists TRL's fields by hand. Our own nodes are typed
below and read the same way, rather than by Hydra at compose time, which stops at the first error.
"""

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import MISSING, OmegaConf
from trl import DPOConfig, KTOConfig, ModelConfig, RewardConfig, SFTConfig
from trl.experimental.cpo import CPOConfig
from trl.experimental.orpo import ORPOConfig

from data_prep.convert import FORMATS, STYLES
from dpo_recipes import ROOT
from dpo_recipes.config import reference
from dpo_recipes.sources import assets, families, tiny

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


@dataclass
class TrainArgs(DPOConfig):
    """trl.DPOConfig and the one training key TRL lacks (the Trainer reads it)."""

    share_prompt: bool = field(
        default=False,
        metadata={
            "help": "each pair as one sequence, prompt + chosen + rejected: the prompt computed once "
            "(sdpa, eager or flex attention)"
        },
    )


# Our own nodes. A Literal type lists a key's choices once: the generic pass refuses any other value.
@dataclass
class DatasetSchema:
    path: str | None = None  # a .json/.jsonl/.parquet file, a folder saved by `datasets`, or a hub id
    format: Literal[FORMATS] = "trl"  # the data_prep converter
    # auto: as the data is (plain strings stay plain text, TRL's standard path with BOS and EOS; messages
    # go through the chat template); conversational: strings wrapped as user/assistant turns; standard:
    # messages written as a "User: ...\n\nAssistant:" transcript
    style: Literal[STYLES] = "auto"
    train_split: str = "train"  # split to read from a hub id or a saved DatasetDict
    subset: str | None = None  # a hub dataset's config name
    eval_path: str | None = None  # a separate eval file, if any
    eval_split: str | None = None  # an eval split of the same dataset, if any
    eval_size: float = 0.0  # with neither: hold out this fraction (<1) or count (>=1) of train's prompts
    max_samples: int | None = None  # keep the first N training rows
    max_eval_samples: int | None = None
    columns: dict[str, str] = field(default_factory=dict)  # our field -> the input's column (--columns)
    messages: dict[str, Any] = field(default_factory=dict)  # role_key, content_key, roles, text_key
    sources: list[dict[str, Any]] = field(default_factory=list)  # instead of path: several, mixed
    # each pair as a desirable and an undesirable row (TRL's unpaired form), for task=kto
    unpair: bool = False


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


# What a run trains (the root key `task`): DPO; a reward model from the same preference data with TRL's
# RewardTrainer; supervised fine-tuning on the chosen answers with TRL's SFTTrainer (the usual step
# before DPO); a preference method without a reference model from trl.experimental: ORPO, or CPO and
# SimPO (CPOTrainer's loss_type); or KTO (TRL's KTOTrainer), which learns from unpaired rows against a
# reference as DPO does. Each reads `train:` as its own config class.
TASKS = {
    "dpo": TrainArgs,
    "reward": RewardConfig,
    "sft": SFTConfig,
    "orpo": ORPOConfig,
    "cpo": CPOConfig,
    "kto": KTOConfig,
}
# What each task other than DPO trains, for the messages that refuse DPO-only options
TRAINS = {
    "reward": "trains a reward model (TRL's RewardTrainer, the Bradley-Terry loss)",
    "sft": "fine-tunes on the chosen answers (TRL's SFTTrainer, the language-model loss on the answer)",
    "orpo": "trains with ORPO (the language-model loss on the chosen answer and a log odds ratio penalty)",
    "cpo": "trains with CPO or SimPO (train.loss_type; the policy's own log-probs, length-normalised for SimPO)",
    "kto": "trains with KTO (each answer rated on its own against the reference, from unpaired rows)",
}


@dataclass
class HardwareSchema:
    device: Literal["cpu", "cuda"] = "cpu"  # what the option needs to train
    engine: Literal["single", "ddp", "deepspeed", "fsdp"] = "single"  # all but single: accelerate launch
    accelerate_config: str | None = None  # the accelerate config file `make train NPROC=...` launches with
    zero_stage: int | None = None  # DeepSpeed's ZeRO stage, on the options that use it
    memory_gb: float | None = None  # per GPU, to plan for: the visible GPU's by default (memory/)
    micro_batch: Literal["auto"] | None = None  # auto: the largest that fits, same effective batch
    master_weights: bool = (
        True  # full fine-tuning keeps fp32 masters (config/precision.py); false: knowingly not
    )


@dataclass
class LoggerSchema:
    name: Literal["none", "wandb", "tensorboard"] = "none"  # train.report_to is set by the same option
    project: str | None = None  # wandb project
    entity: str | None = None  # wandb entity (team or user)
    mode: Literal["online", "offline", "disabled"] = "online"  # wandb's


@dataclass
class ReferenceSchema:
    strategy: Literal[("auto", *reference.STRATEGIES)] = "auto"  # a row of dpo_recipes/config/reference.py
    path: str | None = None  # `path`: the reference model; `sft_adapter`: the SFT LoRA adapter
    revision: str | None = None  # of `path` on the Hub (the policy's model.model_revision is its own)


@dataclass
class JudgeSchema:
    """Who says whether the answers got better (`make eval`; dpo_recipes/after/judge.py)."""

    kind: Literal["none", "reward", "pairwise"] = "none"  # a reward model, or a causal LM asked A or B
    path: str | None = None  # a local folder or a hub id
    revision: str | None = None  # of `path` on the Hub
    # While training: at each evaluation whose step is a multiple of `every` (0: never), the policy's
    # greedy answers to the first `prompts` eval prompts judged against the reference's, logged as
    # eval_judge/win_rate (with its 95% interval); a checkpoint saved at the best judged step is kept.
    every: int = 0
    prompts: int = 32
    max_new_tokens: int = 64


@dataclass
class RoundsSchema:
    """On-policy rounds (`make iterate`; dpo_recipes/after/rounds.py): each round samples `samples`
    answers to each of `prompts` training prompts from the current policy at `temperature`, pairs the
    judge's best against its worst where their scores differ by more than `min_margin`, and trains DPO
    on those pairs, with `offline` of the dataset's own pairs, from the current policy; each round is
    judged on `eval_prompts` held-out prompts."""

    count: int = 3
    samples: int = 4
    prompts: int = 128  # fresh ones each round while the training prompts last
    temperature: float = 1.0
    max_new_tokens: int = 64
    min_margin: float = 0.0  # a reward model's units; a pairwise judge's mean preferences lie in [0, 1]
    eval_prompts: int = 64
    batch_size: int = 32  # prompts generated at once
    offline: int = 0  # the dataset's pairs added to each round's (fresh ones each round while they last)
    engine: str = "auto"  # what samples: vllm | transformers | auto (vLLM where installed and a GPU is there)


@dataclass
class RunSchema:
    name: str | None = None  # a stable run dir, outputs/<recipe>/<name>; default: the launch time
    resume: str = "auto"  # auto (newest complete checkpoint in the run dir) | never | a checkpoint dir
    overwrite: bool = False  # replace a finished run in the same dir
    allow_changes: bool = False  # resume an unfinished run (or a sweep's jobs) with changed settings
    nan_patience: int = 0  # logged steps with a non-finite loss or grad norm tolerated before stopping


@dataclass
class SweepReportSchema:
    # any logged metric: the job with the best final value is picked; None: the task's own
    # (eval_rewards/accuracies; KTO eval_rewards/margins, SFT eval_loss: dpo_recipes/after/sweep.py)
    metric: str | None = None
    higher_is_better: bool = True  # of a metric named here
    tie_break: str = "eval_loss"  # lowest final value wins a tie


OURS = {
    "dataset": DatasetSchema,
    "hardware": HardwareSchema,
    "reference": ReferenceSchema,
    "judge": JudgeSchema,
    "rounds": RoundsSchema,
    "run": RunSchema,
    "sweep_report": SweepReportSchema,
    "logger": LoggerSchema,
}

# The primary config's schema: TRL's nodes as open dicts (read against TRL's dataclasses by the generic
# pass), ours with their defaults.
Schema = dataclasses.make_dataclass(
    "Schema",
    [("task", str, field(default="dpo"))]
    + [(name, dict[str, Any], field(default_factory=dict)) for name in ("model", "train")]
    + [
        (name, dict[str, Any], field(default_factory=lambda cls=cls: dataclasses.asdict(cls())))
        for name, cls in OURS.items()
    ],
)


def cdpo_weights(epsilon: float) -> list[float]:
    """cDPO's label-smoothed sigmoid as TRL's [robust, sigmoid]: -(1 - 2e) * robust + 2(1 - e) * sigmoid."""
    return [-(1 - 2 * epsilon), 2 * (1 - epsilon)]


class UserOptions(SearchPathPlugin):
    """A user's own options before the shipped ones of the same name: DPO_RECIPES_CONFIG lists project
    folders (separated as in PATH), each with `conf/<group>/<option>.yaml` and `recipes/<recipe>.yaml`;
    an earlier folder wins. The `dpo-recipes` command sets it (the current directory, or --config-dir)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for folder in filter(None, os.environ.get("DPO_RECIPES_CONFIG", "").split(os.pathsep)):
            for path in (Path(folder, "conf"), Path(folder)):  # option groups; recipes/
                if path.is_dir():
                    search_path.prepend(
                        "dpo-recipes user", f"file://{path.resolve()}", SearchPathQuery("main")
                    )


Plugins.instance().register(UserOptions)
ConfigStore.instance().store(name="schema", node=Schema)
OmegaConf.register_new_resolver("dpo_root", lambda sub="": str(ROOT / sub), replace=True)
OmegaConf.register_new_resolver("tiny_model", lambda: str(tiny.path()), replace=True)
OmegaConf.register_new_resolver("tiny_judge", lambda: str(tiny.judge_path(build=False)), replace=True)
OmegaConf.register_new_resolver("tiny_qwen", lambda: str(tiny.qwen_path()), replace=True)
OmegaConf.register_new_resolver("tiny_family", lambda family: str(families.path(family)), replace=True)
OmegaConf.register_new_resolver("asset", lambda relative: str(assets.unpacked(relative)), replace=True)
OmegaConf.register_new_resolver("cdpo_weights", cdpo_weights, replace=True)
OmegaConf.register_new_resolver(
    "dpo_first", lambda *values: next((v for v in values if v), None), replace=True
)
# Job dir names without the `++` that plain_keys() adds.
OmegaConf.register_new_resolver("dpo_dirname", lambda name: re.sub(r"(^|,)\+\+", r"\1", name), replace=True)

# `train.max_steps=4` must work whether or not the recipe happens to set that key. Hydra refuses a plain
# override of a key the config lacks, naming only the first; as `++` (add or replace) every such key
# reaches the checks, which report all unknown ones at once, with suggestions.
PLAIN_KEY = re.compile(rf"^(?:{'|'.join(f.name for f in dataclasses.fields(Schema))})\.[\w.]+=")


def plain_keys(overrides: list[str]) -> list[str]:
    return [f"++{o}" if PLAIN_KEY.match(o) else o for o in overrides]


def recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def scalable() -> list[str]:
    """The hardware options that name an accelerate config, so that they run on several processes."""
    options = sorted((CONF_DIR / "hardware").glob("*.yaml"))
    return [
        p.stem for p in options if (yaml.safe_load(p.read_text()) or {})["hardware"].get("accelerate_config")
    ]


def chat_templates() -> dict[str, Path]:
    """The templates shipped in assets/chat_templates/, by name."""
    return {p.stem: p for p in TEMPLATES_DIR.glob("*.jinja")}


def chat_template(name_or_path: str) -> str:
    """The text of a template shipped in assets/chat_templates/ (by name) or of a .jinja file."""
    shipped = chat_templates()
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


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def unknown_keys(node: str, keys, cls) -> list[str]:
    known = _fields(cls)
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
            trl_class = trl_name(cls) if node in ("train", "model") else None
            what = f"not a {trl_class} field" if trl_class else f"unknown {node} key"
            owners = [t for t, c in TASKS.items() if node == "train" and key in _fields(c)]
            if owners:  # another method's key: say which
                what += f"; it belongs to {' and '.join(f'task={t} ({trl_name(TASKS[t])})' for t in owners)}"
            problems.append(f"{node}.{key}: {what}{hint}")
    return problems


def trl_name(cls) -> str:
    """The TRL config class `cls` is or extends: DPOConfig for TrainArgs, ModelConfig for ModelArgs."""
    return next(c.__name__ for c in cls.__mro__ if c.__module__.startswith("trl"))


SIMPLE = (bool, int, float, str, type(None))


def wrong_types(node: str, values: dict, cls) -> list[str]:
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


def fits(node: str, values: dict, cls) -> list[str]:
    """The generic pass over one node: its unknown keys and its wrong types."""
    return unknown_keys(node, values, cls) + wrong_types(node, values, cls)
