"""Compose the Hydra groups and build TRL's objects from them: read once, check once, build once.

`views.read` resolves the composed config into one View; `check` runs the generic key/type pass and the
named rules of rules.py over it, reporting every problem together; `build` turns the checked view into
DPOConfig, ModelConfig, the PEFT and quantization configs and our own nodes, without loading weights.
"""

import copy
import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import PeftConfig
from transformers import BitsAndBytesConfig
from trl import get_peft_config, get_quantization_config

from dpo_recipes.config import precision, reference, rules, views
from dpo_recipes.config.schema import (
    CONF_DIR,
    TASKS,
    DatasetSchema,
    HardwareSchema,
    JudgeSchema,
    LoggerSchema,
    ModelArgs,
    ReferenceSchema,
    RunSchema,
    TrainArgs,
    plain_keys,
)
from dpo_recipes.errors import ConfigError


@dataclass(frozen=True)
class Built:
    """Everything a run needs, read from the composed config once; nothing after build() reads that."""

    task: str  # dpo, or reward
    args: TrainArgs  # a DPOConfig (a RewardConfig for task=reward)
    model: ModelArgs
    peft: PeftConfig | None
    quantization: BitsAndBytesConfig | None
    dataset: DatasetSchema
    hardware: HardwareSchema
    reference: ReferenceSchema  # its strategy resolved: never auto
    run: RunSchema
    logger: LoggerSchema
    judge: JudgeSchema


def compose(overrides: list[str] = ()) -> tuple[DictConfig, str]:
    """Compose like `python -m dpo_recipes.train` would; returns the config and the recipe name."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=plain_keys(overrides), return_hydra_config=True)
    recipe = cfg.hydra.runtime.choices.recipes
    HydraConfig.instance().set_config(cfg)  # option names for messages, as under dpo_recipes.train
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, recipe


def check(cfg: DictConfig, *, machine: bool = True) -> views.View:
    """Raise ConfigError listing every problem that can be seen without loading weights: in the config
    itself, and (`machine`) on this machine and launch. Returns the view read."""
    view = views.read(cfg)
    if problems := rules.problems(view, machine):
        raise ConfigError(problems)
    return view


def build(cfg: DictConfig, output_dir: Path, recipe: str | None = None, *, machine: bool = True) -> Built:
    """Check `cfg`, then build DPOConfig, ModelConfig, the PEFT and quantization configs and our own nodes
    (no weights). The run is named `<recipe>/<run dir>`; a dataset without eval data turns eval off."""
    view = check(cfg, machine=machine)
    train = dict(view.train)
    strategy = reference.resolve(view.reference.strategy, view.lora)
    model_args = ModelArgs(**OmegaConf.to_container(cfg.model, resolve=True))
    dataset = view.dataset
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
    if precision.upcast(view.hardware.engine, view.lora, train, view.hardware.master_weights):
        train["model_init_kwargs"]["dtype"] = "float32"  # the weights are their own fp32 masters
    # TrainingArguments refuses bf16 where no GPU is visible: a run planned here for a GPU (make validate,
    # machine=False) is built as that GPU would build it; nothing trains from it here.
    gpu = "transformers.training_args.is_torch_bf16_gpu_available"
    planned = (
        mock.patch(gpu, lambda: True) if not machine and not torch.cuda.is_available() else nullcontext()
    )
    try:
        with planned:
            args = TASKS[view.task](output_dir=str(output_dir), **train)
    except (ValueError, TypeError) as err:
        raise ConfigError([f"train: {err}"]) from err
    return Built(
        view.task,
        args,
        model_args,
        get_peft_config(model_args),
        get_quantization_config(model_args),
        dataset=dataset,
        hardware=view.hardware,
        reference=dataclasses.replace(view.reference, strategy=strategy),
        run=view.run,
        logger=view.logger,
        judge=view.judge,
    )


def with_batch(built: Built, micro_batch: int, accumulation: int) -> Built:
    """The run with another micro-batch and accumulation (hardware.micro_batch=auto's pick)."""
    args = copy.copy(built.args)
    args.per_device_train_batch_size, args.gradient_accumulation_steps = micro_batch, accumulation
    return dataclasses.replace(built, args=args)
