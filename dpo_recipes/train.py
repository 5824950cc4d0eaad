"""Train: compose the recipe -> build TRL's objects -> load data -> DPOTrainer -> save.

python -m dpo_recipes.train recipes=tiny_lora_dpo train.beta=0.05
"""

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from data_prep.io import write_text
from dpo_recipes import ROOT, config, data
from dpo_recipes.config import ConfigError
from dpo_recipes.data import DataError

LIBRARIES = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "hydra-core"]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def load_reference(built: config.Built):
    """Full fine-tuning needs its own frozen copy of the starting weights; LoRA disables the adapter instead."""
    if built.peft is not None:
        return None
    from trl.trainer.utils import create_model_from_path

    reference = create_model_from_path(built.model.model_name_or_path, **built.args.model_init_kwargs)
    return reference.eval().requires_grad_(False)


def run(cfg: DictConfig, run_dir: Path, recipe: str):
    """Train one recipe into `run_dir`; returns the finished trainer."""
    built = config.build(cfg, run_dir)
    metrics_dir = run_dir / "dpo_metrics"
    if (metrics_dir / "summary.json").exists():
        raise ConfigError([f"{run_dir} already holds a finished run; pick another run dir"])

    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from dpo_recipes.metrics import MetricsCallback

    model_args = built.model
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=built.args.trust_remote_code,
    )
    train_set, eval_set, data_report = data.load(cfg.dataset, built.args.seed, built.args.dataset_num_proc)
    if eval_set is None:
        built.args.eval_strategy = "no"
    context = {
        "recipe": recipe,
        "run_dir": str(run_dir),
        "dataset": {"train": len(train_set), "eval": len(eval_set) if eval_set is not None else 0},
        "data": {
            split: {k: r[k] for k in ("rows_in", "rows_out", "dropped")} for split, r in data_report.items()
        },
        "versions": {name: version(name) for name in LIBRARIES},
        "git_commit": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    trainer = DPOTrainer(
        model=model_args.model_name_or_path,
        ref_model=load_reference(built),
        args=built.args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=built.peft,
        quantization_config=built.quantization,
        callbacks=[MetricsCallback(metrics_dir, context)],
    )
    too_long = {"train": len(train_set) - len(trainer.train_dataset)}
    if eval_set is not None:
        too_long["eval"] = len(eval_set) - len(trainer.eval_dataset)
    for split, n in too_long.items():
        data_report[split]["trl_dropped_prompt_too_long"] = n
        context["data"][split]["trl_dropped_prompt_too_long"] = n
        if n:
            print(
                f"warning: TRL dropped {n} {split} rows whose prompt alone reaches train.max_length="
                f"{built.args.max_length}; raise it to keep them",
                file=sys.stderr,
            )
    write_text(metrics_dir / "data_report.json", json.dumps(data_report, indent=2, ensure_ascii=False))
    trainer.train()
    trainer.save_model(str(run_dir))
    return trainer


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        run(cfg, run_dir, hc.runtime.choices["recipes"])
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"run dir: {run_dir}")


if __name__ == "__main__":
    main()
