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
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback
from trl import RewardConfig

from data_prep.io import write_text
from dpo_recipes import ROOT, config, console, errors
from dpo_recipes.after.judge import selection
from dpo_recipes.after.judging import Judging
from dpo_recipes.config import precision, reference, schema, secrets
from dpo_recipes.memory import measuring, preflight
from dpo_recipes.rundir import launching, paths, planning
from dpo_recipes.sources import hub
from dpo_recipes.training import chat, data, segments, stopping, tokenize, updates
from dpo_recipes.training.metrics import MetricsCallback
from dpo_recipes.training.trainer import OTHERS, REFERENCED, balanced

LIBRARIES = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "hydra-core"]

console.quiet()  # the known harmless warnings, each named with why in console.py


@dataclass(frozen=True)
class Setup:
    """What `prepare` decided before anything loads; every later phase reads it, none changes it."""

    cfg: DictConfig
    built: config.Built
    plan: planning.Plan
    recipe: str
    run_dir: Path
    threads: int
    memory: preflight.Verdict


@dataclass(frozen=True)
class Parts:
    """What `assemble` loaded and wired: the trainer and the callbacks the end of the run reads."""

    trainer: object
    metrics: MetricsCallback
    on_signal: stopping.StopOnSignal
    on_non_finite: stopping.StopOnNonFinite
    measured: measuring.Measured


def run(cfg: DictConfig, run_dir: Path, recipe: str, plan: planning.Plan | None = None):
    """Train one recipe into `run_dir` as the launch's plan (rundir/) says, or as one made now from
    what the dir holds; returns the finished trainer."""
    setup = prepare(cfg, Path(run_dir), recipe, plan)
    parts = assemble(setup)
    train(setup, parts)
    finish(setup, parts)
    return parts.trainer


def prepare(cfg: DictConfig, run_dir: Path, recipe: str, plan: planning.Plan | None) -> Setup:
    """Build, plan, pre-flight and record, before any weight loads: a run that is refused, cannot take
    its layouts or cannot fit stops here with nothing written."""
    threads = share_cores()
    built = config.build(cfg, run_dir, recipe)
    plan = plan or launching.fresh(run_dir, built.run)
    if plan.action in ("refuse", "skip"):
        raise errors.ConfigError([plan.message])
    if why := segments.refused(built):
        raise errors.ConfigError([why])
    memory = preflight.preflight(built, planning.world())
    if memory.batch:  # hardware.micro_batch=auto
        built = config.with_batch(built, *memory.batch)
    lines = [note for note in [precision.note(built)] if note] + memory.lines
    if lines and planning.rank() == 0:
        print("\n".join(lines))
    launching.start(plan, launch_record(cfg))
    use_logger(built.logger, run_dir)
    return Setup(cfg, built, plan, recipe, run_dir, threads, memory)


def assemble(setup: Setup) -> Parts:
    """Tokenizer, data, reference and trainer, with the callbacks that measure, stop and record it."""
    built = setup.built
    tokenizer = chat.tokenizer(built)
    with built.args.main_process_first(desc="converting the data"):  # the others read its cache
        train_set, eval_set, data_report = data.load(
            built.dataset, built.args.seed, built.args.dataset_num_proc
        )
    data_report["train"]["template_notes"] = chat.check_template(tokenizer, train_set, built)
    for note in data_report["train"]["template_notes"]:
        print(f"note: {note}")
    balanced(built, train_set, data_report["train"])
    on_signal, on_non_finite = stopping.StopOnSignal(), stopping.StopOnNonFinite(built.run.nan_patience)
    trainer = trainer_of(built, tokenizer, (train_set, eval_set), [on_signal, on_non_finite])
    console.use(trainer)
    kept = trl_kept(trainer, (train_set, eval_set), data_report)
    context = {
        **describe(setup, (train_set, eval_set), data_report, kept),
        **tokenized(trainer, data_report),
        "torch_threads": setup.threads,
    }
    for split in kept:
        print(f"{split} data: {data.counts_line(context['dataset'][split])}")
    metrics = MetricsCallback(paths.metrics_dir(setup.run_dir), context)
    measured = measuring.Measured(trainer, built.hardware.engine)
    callbacks = [metrics] + ([measured] if setup.memory.record is not None else [])
    if hasattr(trainer, "_metrics"):  # TRL's per-step metrics, averaged at each log
        callbacks.append(updates.UpdateProbe(trainer))
    for callback in callbacks:
        trainer.add_callback(callback)
    if trainer.is_world_process_zero():
        write_text(metrics.out_dir / paths.DATA_REPORT, json.dumps(data_report, indent=2, ensure_ascii=False))
    return Parts(trainer, metrics, on_signal, on_non_finite, measured)


def train(setup: Setup, parts: Parts) -> None:
    """Train as planned: from the start, or from the plan's checkpoint."""
    plan = setup.plan
    if plan.message and plan.action != "replace":
        print(plan.message, file=sys.stderr)
    if plan.checkpoint:
        print(f"resuming from {plan.checkpoint}")
    launching.TRAINED.add(plan.dir)
    try:
        parts.trainer.train(resume_from_checkpoint=plan.checkpoint)
    except Exception as err:
        stopping.failed(parts.trainer, parts.metrics, err, setup.recipe)
        raise
    finally:
        parts.measured.close()


def finish(setup: Setup, parts: Parts) -> None:
    """Health, save and summary (stopping.finish), the peak memory predicted and measured among them."""
    record = setup.memory.record
    memory = None if record is None else {**record, **parts.measured.found}
    stopping.finish(
        parts.trainer, parts.metrics, parts.on_signal, parts.on_non_finite, setup.recipe, memory=memory
    )
    launching.release(setup.plan.dir)


def trainer_of(built: config.Built, tokenizer, sets: tuple, callbacks: list[TrainerCallback]):
    """TRL's own trainer for a task without a reference (trainer.OTHERS; SFT on the chosen answers);
    else, with the reference strategy's models, RecipeTrainer (DPO, with its judge) or KTOTrainer."""
    train_set, eval_set = sets
    judging = None
    if built.task == "dpo" and built.judge.every and eval_set is not None:
        with built.args.main_process_first(desc="the judge"):  # the first process builds a tiny one
            judging = Judging(built.judge, selection(eval_set["prompt"], built.judge.prompts))
    with hub.fetching("model", built.model.model_name_or_path, "model.model_name_or_path"):
        if built.task not in REFERENCED:  # TRL's own trainer for the task, with no reference model
            train_set, eval_set = map(data.completions, sets) if built.task == "sft" else sets
            return OTHERS[built.task](
                model=built.model.model_name_or_path,
                args=built.args,
                train_dataset=train_set,
                eval_dataset=eval_set,
                processing_class=tokenizer,
                peft_config=built.peft,
                callbacks=callbacks,
                **({"quantization_config": built.quantization} if built.task == "reward" else {}),
            )
        policy, ref_model, peft = reference.load(built)
        return REFERENCED[built.task](
            model=policy,
            ref_model=ref_model,
            args=built.args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            peft_config=peft,
            quantization_config=built.quantization if isinstance(policy, str) else None,
            callbacks=callbacks,
            **({"judging": judging} if built.task == "dpo" else {}),
        )


def tokenized(trainer, data_report: dict) -> dict:
    """How the data was tokenized (the reward model's: TRL's own path) and a precomputed reference's
    cache; notes the template's default system message in the data report."""
    found = {"tokenize": getattr(trainer, "tokenize_log", None)}
    if hasattr(trainer, "ref_logps_cache"):
        found["precomputed"] = trainer.ref_logps_cache
        print(f"reference log-probs: {trainer.ref_logps_cache} (hit = reused from the cache)")
    injected = tokenize.template_system_prompt(trainer.processing_class)
    data_report["train"]["template_system_prompt"] = injected
    if injected and trainer.is_world_process_zero():
        print(f"note: the chat template gives rows without a system message this one: {injected!r}")
    return found


def trl_kept(trainer, sets: tuple, data_report: dict) -> dict[str, int]:
    """The rows TRL kept of each split: it drops rows too long for train.max_length. The drops go into
    the data report with a warning naming the fix; a split it would empty stops the run."""
    if not isinstance(trainer, (*REFERENCED.values(), OTHERS["reward"])):  # the others drop none
        return {
            split: len(rows) for split, rows in zip(("train", "eval"), sets, strict=True) if rows is not None
        }
    max_length = trainer.args.max_length  # None: no truncation, and TRL drops nothing
    limit = getattr(trainer.model.config, "max_position_embeddings", None)
    fix = "raise train.max_length" + (f" (the model takes up to {limit} tokens)" if limit else "")
    if limit and max_length is not None and max_length >= limit:
        fix = f"train.max_length is at the model's position limit ({limit} tokens): shorten those prompts"
    # DPOTrainer drops a row whose prompt alone reaches max_length; RewardTrainer one whose prompt and
    # answer, either one, is longer
    reward = isinstance(trainer.args, RewardConfig)
    key, why = (
        ("too_long", "prompt and answer exceed") if reward else ("prompt_too_long", "prompt alone reaches")
    )
    kept = {}
    for split, before, after in zip(
        ("train", "eval"), sets, (trainer.train_dataset, trainer.eval_dataset), strict=True
    ):
        if before is None:
            continue
        kept[split] = len(after)
        dropped = data_report[split][f"trl_dropped_{key}"] = len(before) - len(after)
        if dropped == len(before):
            raise errors.DataError(
                f"all {dropped} {split} rows: their {why} train.max_length={max_length} tokens, "
                f"so TRL would train on nothing; {fix}"
            )
        if dropped:
            print(
                f"warning: TRL dropped {dropped} of {len(before)} {split} rows whose {why} "
                f"train.max_length={max_length}; {fix}",
                file=sys.stderr,
            )
    return kept


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def use_logger(logger: schema.LoggerSchema, run_dir: Path) -> None:
    """Point wandb at the project and into the run dir."""
    if logger.name == "wandb":
        settings = {"WANDB_PROJECT": logger.project, "WANDB_ENTITY": logger.entity, "WANDB_MODE": logger.mode}
        os.environ.update({k: str(v) for k, v in settings.items() if v})
        os.environ["WANDB_DIR"] = str(run_dir)


def usable_cores() -> int:
    """The cores this process may run on: a scheduler's cpuset or `taskset` gives fewer than the machine
    has (os.cpu_count())."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def share_cores() -> int:
    """Give this process its share of the cores: processes side by side on one machine (the ranks of
    a launch, a joblib sweep's jobs) each with torch's default of every core slow each other down many
    times over. Returns the threads set for torch and OpenMP (the data workers inherit it)."""
    parallel = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        jobs = HydraConfig.get().launcher.get("n_jobs") or 1  # joblib's; other launchers have none
        parallel *= usable_cores() if jobs < 0 else jobs
    threads = max(1, usable_cores() // parallel)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def row_counts(report: dict, train_rows: int | bool, kept: int | None) -> dict:
    """A split's rows on their way to TRL, in order, down to the rows TRL kept."""
    found = {
        "rows_read": report["rows_in"],
        "rows_kept_by_conversion": report["rows_out"],
        "dropped_by_conversion": report["dropped"],
    }
    if "rows_mixed" in report:  # dataset.sources: the share of each source's rows taken
        found["rows_mixed"] = report["rows_mixed"]
    if train_rows is not False:  # dataset.unpair: the pairs trained on, before each became two rows
        trained = report.get("pairs_unpaired", train_rows)
        found["rows_held_out_for_eval"] = report.get("rows_mixed", report["rows_out"]) - trained
    if "rows_unpaired" in report:  # dataset.unpair: two rows a pair, less the repeats
        found["rows_unpaired"] = report["rows_unpaired"]
    if kept is not None:
        found["rows_kept_by_trl"] = kept
    return found


def describe(setup: Setup, sets: tuple, report: dict, kept: dict[str, int]) -> dict:
    """What summary.json says of the run besides its metrics; the composed config is saved as it is."""
    built, (train_set, _) = setup.built, sets
    counts = {
        split: row_counts(r, split == "train" and len(train_set), kept.get(split))
        for split, r in report.items()
    }
    return {
        "recipe": setup.recipe,
        "run_dir": str(setup.run_dir),
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
        "launch": stopping.launched_with(),  # make's HARDWARE, NPROC, NNODES under several processes
        "dataset": counts,
        "eval_source": report["eval"]["source"] if "eval" in report else None,
        "versions": {name: version(name) for name in LIBRARIES},
        "git_commit": git_commit(),
        "task": built.task,
        "reference": {"strategy": built.reference.strategy, "path": built.reference.path}
        if built.task in REFERENCED
        else None,
        "config": OmegaConf.to_container(setup.cfg, resolve=True),
    }


def launch_record(cfg: DictConfig) -> dict:
    """How this launch ran, kept beside Hydra's record of it: a relaunch compares its world size."""
    hardware = HydraConfig.get().runtime.choices.get("hardware") if HydraConfig.initialized() else None
    return {"world_size": planning.world(), "hardware": hardware, "make": stopping.launched_with()}


@hydra.main(version_base="1.3", config_path=str(schema.CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    plan = launching.planned(run_dir, cfg.run, sweep=hc.mode == RunMode.MULTIRUN)
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
            write_text(run_dir / paths.FAILED, json.dumps({"error": f"{type(err).__name__}: {err}"}))
            print(f"job {hc.job.num} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return
        code = errors.exit_code(err)
        if code is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(code)
    finally:  # jobs of one sweep share the process: free this job's model before the next one loads
        launching.release(plan.dir)
        if not trained and hc.mode == RunMode.RUN and plan.dir not in launching.TRAINED:
            launching.discard(plan)
        launching.PLANS.pop(plan.dir, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.argv[1:] = overrides = config.plain_keys(sys.argv[1:])
    if leaked := secrets.in_overrides(overrides):  # before Hydra saves any of them
        print("error: invalid config:\n" + "\n".join(f"  - {p}" for p in leaked), file=sys.stderr)
        sys.exit(2)
    if ("-m" in overrides or "--multirun" in overrides) and (refused := launching.sweep_changes(overrides)):
        print(f"error: invalid config:\n  - {refused}", file=sys.stderr)
        sys.exit(2)
    if not any(o.startswith("-") for o in overrides):  # a sweep's jobs plan their own dirs; --cfg, --help
        launch = launching.decide(overrides)
        if launch.action == "refuse":
            print(f"error: invalid config:\n  - {launch.message}", file=sys.stderr)
            sys.exit(2)
        sys.argv[1:] = launch.overrides
    main()
