"""The run dir's layout, named once: the metrics folder and its files, the records of each launch, the
lock, checkpoints and weights. Every module that reads or writes a run dir takes its names from here."""

import fnmatch
import json
from pathlib import Path

CHECKPOINT = "checkpoint-"
METRICS = "dpo_metrics"  # what a run exports, in these files:
SUMMARY = "summary.json"
SUMMARY_TEXT = "summary.md"  # the verdict block, in words
CSV = "training_metrics.csv"
CURVES = "training_curves.png"
HISTORY = "log_history.json"
DATA_REPORT = "data_report.json"
SAMPLES = ("samples.jsonl", "samples.md")  # make samples
EVAL = ("eval.jsonl", "eval.json")  # make eval
FAILED = "job_status.json"  # a sweep's job that failed: its error (a finished job has a summary)
RECORD = ".hydra"
RELAUNCHED = f"{RECORD}/relaunched"
LAUNCH = "launch.yaml"  # in each record, beside Hydra's files
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
CONFIG, OVERRIDES = HYDRA_FILES[0], HYDRA_FILES[2]
EXPORT = "export"  # make export's default output
ROUNDS = ("rounds.json", "rounds.md", "rounds.png")  # make iterate's report across rounds, in its dir
LOCK = ".launch.lock"  # the live launch holding the dir: host, pid, launch time
# What a run and the steps after it write at the top of its dir (the only names run.overwrite removes):
# records, metrics, checkpoints, weights, tokenizer files, the model card, loggers' folders, exports
WRITTEN = (
    RECORD, METRICS, f"{CHECKPOINT}*", "changes_*.yaml", LOCK, EXPORT, "wandb", "runs", "*.log",
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "adapter_config.json", "training_args.bin", "README.md", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt", "*.model",
)  # fmt: skip


def metrics_dir(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS


def summary_file(run_dir: Path) -> Path:
    return metrics_dir(run_dir) / SUMMARY


def summary(run_dir: Path) -> dict:
    try:
        return json.loads(summary_file(run_dir).read_text())
    except (OSError, ValueError):
        return {}


def checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob(f"{CHECKPOINT}*") if p.is_dir() and p.name[len(CHECKPOINT) :].isdigit()]
    return sorted(found, key=step)


def checkpoint(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{CHECKPOINT}{step}"


def step(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT) :])


def complete(checkpoint: Path) -> bool:
    """A checkpoint is complete once the Trainer wrote trainer_state.json, its last file."""
    try:
        return "global_step" in json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False


def records(run_dir: Path) -> list[Path]:
    """The records of the run's launches, oldest first."""
    first = [run_dir / RECORD] if (run_dir / RECORD / "overrides.yaml").exists() else []
    later = sorted(p.parent for p in (run_dir / RELAUNCHED).glob("*/overrides.yaml"))
    return first + later


def written(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in WRITTEN)


WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def missing_weights(run_dir: Path) -> list[str]:
    """What a finished run must hold and does not: its weights (adapter or model) and its tokenizer."""
    missing = [] if any((run_dir / name).exists() for name in WEIGHTS) else ["weights"]
    return missing + ([] if (run_dir / "tokenizer_config.json").exists() else ["tokenizer"])
