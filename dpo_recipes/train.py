"""Train: compose the recipe -> build TRL's objects -> load data -> DPOTrainer -> save.

python -m dpo_recipes.train recipes=tiny_lora_dpo train.beta=0.05
"""
# ruff: noqa: E402  (the start-up interrupt handler goes in before the heavy imports it covers)

import signal
import sys


def _interrupted(signum, frame):
    name = signal.Signals(signum).name
    print(
        f"\n{name} outside the training loop: stopped; a run resumes from its newest complete checkpoint",
        file=sys.stderr,
    )
    sys.exit(128 + signum)


if __name__ == "__main__":  # Ctrl-C while the libraries load or the data converts: one line, no traceback
    signal.signal(signal.SIGINT, _interrupted)

import gc
import json
import os
import subprocess
import warnings
from importlib.metadata import version
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from trl import RewardConfig

from data_prep.io import write_text
from dpo_recipes import (
    ROOT,
    config,
    data,
    hub,
    memory,
    precision,
    reference,
    rundir,
    runs,
    schema,
    secrets,
    sweep,
    tokenize,
)
from dpo_recipes.data import DataError

LIBRARIES = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "hydra-core"]
# DeepSpeed 0.19 calls torch.distributed's reduce_scatter_tensor and all_gather_into_tensor, which torch
# deprecates by name: a FutureWarning at every collective (hundreds a step under ZeRO-3), about a name
# DeepSpeed will change, never about the run
warnings.filterwarnings(
    "ignore",
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    FutureWarning,
)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def note_data(trainer, tokenizer, train_set, eval_set, data_report: dict, context: dict, metrics_dir: Path):
    """What happened to the data on its way to TRL: the tokenization path, a precomputed reference's
    cache, the rows TRL dropped for length (stop if none is left), the template's default system
    message; then the data report."""
    context["tokenize"] = getattr(trainer, "tokenize_log", None)  # the reward model's: TRL's own path
    if hasattr(trainer, "ref_logps_cache"):
        context["reference"]["precomputed"] = trainer.ref_logps_cache
        print(f"reference log-probs: {trainer.ref_logps_cache} (hit = reused from the cache)")
    max_length = trainer.args.max_length  # None: no truncation, and TRL drops nothing
    limit = getattr(trainer.model.config, "max_position_embeddings", None)
    fix = "raise train.max_length" + (f" (the model takes up to {limit} tokens)" if limit else "")
    if limit and max_length is not None and max_length >= limit:
        fix = f"train.max_length is at the model's position limit ({limit} tokens): shorten those prompts"
    for split, before, after in (
        ("train", train_set, trainer.train_dataset),
        ("eval", eval_set, trainer.eval_dataset),
    ):
        if before is None:
            continue
        counts = context["dataset"][split]  # from row_counts()
        counts["rows_kept_by_trl"] = len(after)
        # DPOTrainer drops a row whose prompt alone reaches max_length; RewardTrainer one whose prompt and
        # answer, either one, is longer
        reward = isinstance(trainer.args, RewardConfig)
        key, why = (
            ("too_long", "prompt and answer exceed")
            if reward
            else ("prompt_too_long", "prompt alone reaches")
        )
        dropped = data_report[split][f"trl_dropped_{key}"] = len(before) - len(after)
        if dropped == len(before):
            raise DataError(
                f"all {dropped} {split} rows: their {why} train.max_length={max_length} tokens, "
                f"so TRL would train on nothing; {fix}"
            )
        if dropped:
            print(
                f"warning: TRL dropped {dropped} of {len(before)} {split} rows whose {why} "
                f"train.max_length={max_length}; {fix}",
                file=sys.stderr,
            )
        print(f"{split} data: {data.counts_line(counts)}")
    injected = tokenize.template_system_prompt(tokenizer)
    data_report["train"]["template_system_prompt"] = injected
    if trainer.is_world_process_zero():
        if injected:
            print(f"note: the chat template gives rows without a system message this one: {injected!r}")
        write_text(metrics_dir / "data_report.json", json.dumps(data_report, indent=2, ensure_ascii=False))


def use_logger(logger: schema.LoggerSchema, run_dir: Path) -> None:
    """Point wandb at the project and into the run dir."""
    if logger.name == "wandb":
        settings = {"WANDB_PROJECT": logger.project, "WANDB_ENTITY": logger.entity, "WANDB_MODE": logger.mode}
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


def row_counts(report: dict, train_rows: int | bool) -> dict:
    """A split's rows on their way to TRL, in order; note_data() adds rows_kept_by_trl."""
    found = {
        "rows_read": report["rows_in"],
        "rows_kept_by_conversion": report["rows_out"],
        "dropped_by_conversion": report["dropped"],
    }
    if "rows_mixed" in report:  # dataset.sources: the share of each source's rows taken
        found["rows_mixed"] = report["rows_mixed"]
    if train_rows is not False:
        found["rows_held_out_for_eval"] = report.get("rows_mixed", report["rows_out"]) - train_rows
    return found


def describe(
    cfg: DictConfig, built: config.Built, recipe: str, run_dir: Path, sets: tuple, report: dict
) -> dict:
    """What summary.json says of the run besides its metrics; the composed config is saved as it is."""
    train_set, eval_set = sets
    return {
        "recipe": recipe,
        "run_dir": str(run_dir),
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
        "launch": runs.launched_with(),  # make's HARDWARE, NPROC, NNODES under several processes
        "dataset": {split: row_counts(r, split == "train" and len(train_set)) for split, r in report.items()},
        "eval_source": report["eval"]["source"] if "eval" in report else None,
        "versions": {name: version(name) for name in LIBRARIES},
        "git_commit": git_commit(),
        "task": built.task,
        "reference": {"strategy": built.reference.strategy, "path": built.reference.path}
        if built.task == "dpo"
        else None,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def launch_record(cfg: DictConfig) -> dict:
    """How this launch ran, kept beside Hydra's record of it: a relaunch compares its world size."""
    hardware = HydraConfig.get().runtime.choices.get("hardware") if HydraConfig.initialized() else None
    return {"world_size": rundir.world(), "hardware": hardware, "make": runs.launched_with()}


def layouts_refused(built: config.Built) -> str | None:
    """Why the model cannot take the packed layouts asked for (trainer.layouts_refused), from its config."""
    if built.task != "dpo" or not (built.args.padding_free or built.args.share_prompt):
        return None
    from dpo_recipes.trainer import layouts_refused

    try:
        model = memory.model_config(built.model.model_name_or_path, built.model.model_revision)
    except hub.Unreachable:
        raise
    except (OSError, ValueError):  # a local folder without a model's config: loading it says what is wrong
        return None
    return layouts_refused(built.args, model)


def run(cfg: DictConfig, run_dir: Path, recipe: str, plan: rundir.Plan | None = None):
    """Train one recipe into `run_dir` as the launch's plan (rundir.py) says, or as one made now from
    what the dir holds; returns the finished trainer."""
    threads = share_cores()
    built = config.build(cfg, run_dir, recipe)
    plan = plan or rundir.fresh(run_dir, built.run)
    if plan.action in ("refuse", "skip"):
        raise config.ConfigError([plan.message])
    # Before any weight loads or file is written: a layout the model cannot take, a run that cannot fit
    if why := layouts_refused(built):
        raise config.ConfigError([why])
    predicted, lines = memory.preflight(built, rundir.world())
    lines = [note for note in [precision.note(built)] if note] + lines
    if lines and int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(lines))
    rundir.start(plan, launch_record(cfg))
    use_logger(built.logger, run_dir)

    from dpo_recipes import models
    from dpo_recipes.metrics import MetricsCallback
    from dpo_recipes.trainer import Trainer

    tokenizer = models.tokenizer(built)
    with built.args.main_process_first(desc="converting the data"):  # the others read its cache
        train_set, eval_set, data_report = data.load(
            built.dataset, built.args.seed, built.args.dataset_num_proc
        )
    data_report["train"]["template_notes"] = models.check_template(tokenizer, train_set, built)
    for note in data_report["train"]["template_notes"]:
        print(f"note: {note}")
    context = {
        **describe(cfg, built, recipe, run_dir, (train_set, eval_set), data_report),
        "torch_threads": threads,
        "memory": predicted,
    }
    metrics = MetricsCallback(run_dir / "dpo_metrics", context)
    on_signal, on_non_finite = runs.StopOnSignal(), runs.StopOnNonFinite(built.run.nan_patience)
    judging = None
    if built.judge.every and eval_set is not None:
        from dpo_recipes.evaluate import Judging

        with built.args.main_process_first(desc="the judge"):  # the first process builds a tiny one
            judging = Judging(
                built.judge, eval_set.select(range(min(built.judge.prompts, len(eval_set))))["prompt"]
            )
    with hub.fetching("model", built.model.model_name_or_path, "model.model_name_or_path"):
        if built.task == "reward":  # a score head on the model, trained on the same pairs
            from trl import RewardTrainer

            trainer = RewardTrainer(
                model=built.model.model_name_or_path,
                args=built.args,
                train_dataset=train_set,
                eval_dataset=eval_set,
                processing_class=tokenizer,
                peft_config=built.peft,
                quantization_config=built.quantization,
                callbacks=[metrics, on_signal, on_non_finite],
            )
        else:
            policy, ref_model, peft = reference.load(built)
            trainer = Trainer(
                model=policy,
                ref_model=ref_model,
                args=built.args,
                train_dataset=train_set,
                eval_dataset=eval_set,
                processing_class=tokenizer,
                peft_config=peft,
                quantization_config=built.quantization if isinstance(policy, str) else None,
                callbacks=[metrics, on_signal, on_non_finite],
                judging=judging,
            )
    measured = memory.Measured(trainer, predicted or {}, built.hardware.engine)
    if predicted is not None:
        trainer.add_callback(measured)
    if hasattr(trainer, "_metrics"):  # TRL's per-step metrics, averaged at each log
        trainer.add_callback(precision.UpdateProbe(trainer))
    note_data(trainer, tokenizer, train_set, eval_set, data_report, context, metrics.out_dir)
    if plan.message and plan.action != "replace":
        print(plan.message, file=sys.stderr)
    if plan.checkpoint:
        print(f"resuming from {plan.checkpoint}")
    rundir.TRAINED.add(plan.dir)
    try:
        trainer.train(resume_from_checkpoint=plan.checkpoint)
    finally:
        measured.close()
    runs.finish(trainer, metrics, on_signal, on_non_finite, recipe)
    rundir.release(plan.dir)
    return trainer


@hydra.main(version_base="1.3", config_path=str(schema.CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    plan = rundir.planned(run_dir, cfg.run, sweep=hc.mode == RunMode.MULTIRUN)
    if plan.action == "refuse" and hc.mode == RunMode.MULTIRUN:  # the whole sweep stops, nothing written
        print(f"error: job {hc.job.num}: {plan.message}", file=sys.stderr)
        sys.exit(2)
    if plan.action == "skip":
        print(f"job {hc.job.num}: {plan.message} ({run_dir})")
        return
    trained = False
    try:
        run(cfg, run_dir, hc.runtime.choices["recipes"], plan)
        trained = True
    except Exception as err:
        if hc.mode == RunMode.MULTIRUN:  # one failed job must not stop the sweep: the report lists it
            write_text(run_dir / sweep.FAILED, json.dumps({"error": f"{type(err).__name__}: {err}"}))
            print(f"job {hc.job.num} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return
        code = runs.exit_code(err)
        if code is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(code)
    finally:  # jobs of one sweep share the process: free this job's model before the next one loads
        rundir.release(plan.dir)
        if not trained and hc.mode == RunMode.RUN and plan.dir not in rundir.TRAINED:
            rundir.discard(plan)
        rundir.PLANS.pop(plan.dir, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"run dir: {run_dir}")


if __name__ == "__main__":
    sys.argv[1:] = overrides = config.plain_keys(sys.argv[1:])
    if leaked := secrets.in_overrides(overrides):  # before Hydra saves any of them
        print("error: invalid config:\n" + "\n".join(f"  - {p}" for p in leaked), file=sys.stderr)
        sys.exit(2)
    if ("-m" in overrides or "--multirun" in overrides) and (refused := rundir.sweep_changes(overrides)):
        print(f"error: invalid config:\n  - {refused}", file=sys.stderr)
        sys.exit(2)
    if not any(o.startswith("-") for o in overrides):  # a sweep's jobs plan their own dirs; --cfg, --help
        launch = rundir.decide(overrides)
        if launch.action == "refuse":
            print(f"error: invalid config:\n  - {launch.message}", file=sys.stderr)
            sys.exit(2)
        sys.argv[1:] = launch.overrides
    main()
