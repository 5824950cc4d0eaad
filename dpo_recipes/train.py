"""Train: compose the recipe -> build TRL's objects -> load data -> DPOTrainer -> save.

python -m dpo_recipes.train recipes=tiny_lora_dpo train.beta=0.05
"""

import gc
import json
import os
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from data_prep.io import write_text
from dpo_recipes import ROOT, config, data, health, hub, runs, sweep, tokenize
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


def note_length_drops(trainer, train_set, eval_set, data_report: dict, context: dict) -> None:
    """TRL silently drops rows whose prompt alone reaches max_length: count them, and stop if none is left."""
    max_length = trainer.args.max_length
    for split, before, after in (
        ("train", train_set, trainer.train_dataset),
        ("eval", eval_set, trainer.eval_dataset),
    ):
        if before is None:
            continue
        dropped = len(before) - len(after)
        data_report[split]["trl_dropped_prompt_too_long"] = context["data"][split][
            "trl_dropped_prompt_too_long"
        ] = dropped
        if dropped == len(before):
            raise DataError(
                f"all {dropped} {split} rows have a prompt of at least train.max_length={max_length} tokens, "
                "so TRL would train on nothing; raise train.max_length"
            )
        if dropped:
            print(
                f"warning: TRL dropped {dropped} of {len(before)} {split} rows whose prompt alone reaches "
                f"train.max_length={max_length}; raise it to keep them",
                file=sys.stderr,
            )


def use_logger(cfg: DictConfig, built: config.Built, run_dir: Path, recipe: str) -> None:
    """Name the run after the recipe and its dir; point wandb at the project and into the run dir."""
    built.args.run_name = f"{recipe}/{run_dir.name}"
    if cfg.logger.name == "wandb":
        settings = {
            "WANDB_PROJECT": cfg.logger.project,
            "WANDB_ENTITY": cfg.logger.entity,
            "WANDB_MODE": cfg.logger.mode,
        }
        os.environ.update({k: str(v) for k, v in settings.items() if v})
        os.environ["WANDB_DIR"] = str(run_dir)


def share_cores() -> int:
    """Give this process its share of the cores: processes side by side on one machine (the ranks of
    a launch, a joblib sweep's jobs) each with torch's default of every core slow each other down many
    times over. Returns the threads set for torch and OpenMP (the data workers inherit it)."""
    parallel = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        jobs = HydraConfig.get().launcher.get("n_jobs") or 1  # joblib's; other launchers have none
        parallel *= os.cpu_count() if jobs < 0 else jobs
    threads = max(1, (os.cpu_count() or 1) // parallel)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def run(cfg: DictConfig, run_dir: Path, recipe: str):
    """Train one recipe into `run_dir`; returns the finished trainer."""
    threads = share_cores()
    built = config.build(cfg, run_dir)
    runs.guard(run_dir, cfg.run)
    use_logger(cfg, built, run_dir, recipe)
    metrics_dir = run_dir / "dpo_metrics"

    from transformers import AutoTokenizer

    from dpo_recipes import models
    from dpo_recipes.metrics import MetricsCallback

    model_args = built.model
    with hub.fetching("tokenizer of the model", model_args.model_name_or_path, "model.model_name_or_path"):
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=built.args.trust_remote_code,
        )
    if model_args.chat_template:
        tokenizer.chat_template = config.chat_template(model_args.chat_template)
    train_set, eval_set, data_report = data.load(cfg.dataset, built.args.seed, built.args.dataset_num_proc)
    if tokenizer.chat_template is None and isinstance(train_set[0]["prompt"], list):
        raise ConfigError(
            [
                f"the data is conversational and the tokenizer of {model_args.model_name_or_path} has no chat "
                "template (a base model's, say): name one with model.chat_template=chatml, llama3 or tiny, "
                "or a .jinja file"
            ]
        )
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
        "torch_threads": threads,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    metrics = MetricsCallback(metrics_dir, context)
    on_signal, on_non_finite = runs.StopOnSignal(), runs.StopOnNonFinite(cfg.run.nan_patience)
    with hub.fetching("model", model_args.model_name_or_path, "model.model_name_or_path"):
        policy, reference, peft = models.load(built, cfg)
        trainer = models.Trainer(
            model=policy,
            ref_model=reference,
            args=built.args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            peft_config=peft,
            quantization_config=built.quantization if isinstance(policy, str) else None,
            callbacks=[metrics, on_signal, on_non_finite],
        )
    context["tokenize"] = trainer.tokenize_log
    context["reference"] = {"strategy": config.reference_strategy(cfg), "path": cfg.reference.path}
    if hasattr(trainer, "ref_logps_cache"):
        context["reference"]["precomputed"] = trainer.ref_logps_cache
        print(f"reference log-probs: {trainer.ref_logps_cache} (hit = reused from the cache)")
    note_length_drops(trainer, train_set, eval_set, data_report, context)
    injected = tokenize.template_system_prompt(tokenizer)
    data_report["train"]["template_system_prompt"] = injected
    if injected and trainer.is_world_process_zero():
        print(f"note: the chat template gives rows without a system message this one: {injected!r}")
    if trainer.is_world_process_zero():
        write_text(metrics_dir / "data_report.json", json.dumps(data_report, indent=2, ensure_ascii=False))
    trainer.train(resume_from_checkpoint=runs.resume_point(run_dir, cfg.run))
    flags = health.check(trainer.state.log_history)
    for flag in flags:
        print(f"health: {flag['flag']}: {flag['problem']}; try: {flag['fix']}", file=sys.stderr)
    if on_signal.received is not None or on_non_finite.error:
        status = "interrupted" if on_signal.received is not None else "stopped: non-finite"
        metrics.write_summary(trainer.state, status, health=flags)
        if on_non_finite.error:
            raise runs.Stopped(on_non_finite.error)
        name = signal.Signals(on_signal.received).name
        hint = runs.resume_hint(run_dir, recipe)
        raise runs.Stopped(
            f"{name} at step {trainer.state.global_step}: checkpoint saved; resume with {hint}",
            128 + on_signal.received,
        )
    trainer.save_model(str(run_dir))
    metrics.write_summary(trainer.state, "finished", health=flags)
    return trainer


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        run(cfg, run_dir, hc.runtime.choices["recipes"])
    except Exception as err:
        if hc.mode == RunMode.MULTIRUN:  # one failed job must not stop the sweep: the report lists it
            write_text(run_dir / sweep.FAILED, json.dumps({"error": f"{type(err).__name__}: {err}"}))
            print(f"job {hc.job.num} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return
        if not isinstance(err, ConfigError | DataError | hub.Unreachable | runs.Stopped):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code if isinstance(err, runs.Stopped) else 2)
    finally:  # jobs of one sweep share the process: free this job's model before the next one loads
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"run dir: {run_dir}")


if __name__ == "__main__":
    sys.argv[1:] = config.plain_keys(sys.argv[1:])
    main()
