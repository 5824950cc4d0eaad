"""Export a run as a standalone model: a LoRA run merged into its base weights (safetensors, sharded, in
the base's dtype), a full run copied as is; with the tokenizer, its chat template and a model card.

python -m dpo_recipes.after.export <run dir> [--out DIR] [--max-shard-size 5GB] [--force] [--checkpoint best]
    [--push-to-hub REPO]
"""

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from data_prep.io import atomic_path
from dpo_recipes import errors
from dpo_recipes.after import judge, trained
from dpo_recipes.rundir import paths
from dpo_recipes.sources import hub
from dpo_recipes.training import chat, data, metrics

# What a run or checkpoint folder holds besides the model and its tokenizer.
TRAINING_FILES = [
    "training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json",
    "train.log", "changes_*.yaml", "README.md",
]  # fmt: skip
CARD_METRICS = ["judge/win_rate", "rewards/accuracies", "rewards/margins", "accuracy", "margin", "loss"]


def merged(run: trained.Run, out: Path, max_shard_size: str) -> str:
    """Merge the run's adapter into its base and save the result; returns what was done, in words."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    model = run.config["model"]
    quantized = model.get("load_in_4bit") or model.get("load_in_8bit")
    dtype = "bfloat16" if quantized else run.dtype
    base = trained.base(run, dtype)
    model = PeftModel.from_pretrained(base, run.weights).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(run.weights)  # its EOS may be the template's end of turn
    if run.task == "reward":  # a reward model reads each row's score at its last token before padding
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model.generation_config.eos_token_id = chat.stops(tokenizer, model.generation_config)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if quantized:
        return "the adapter merged into the base loaded in bf16 (not into its quantized weights)"
    return f"the adapter merged into the base, in {dtype}"


def copied(run: trained.Run, out: Path) -> str:
    for file in run.weights.iterdir():
        if file.is_file() and not any(fnmatch.fnmatch(file.name, p) for p in TRAINING_FILES):
            shutil.copy2(file, out / file.name)
    return "the fine-tuned weights, copied as they are"


# An absolute path: a card names local files relative to the current directory, or by name
ABSOLUTE = re.compile(r"(?<![\w:/.~-])/[\w.+-][^\s`'\"(),;|]*")


def portable(text: str) -> str:
    """`text` with every absolute path made one another machine can read: relative to the current
    directory where it is under it, else the file or folder's name."""

    def local(match: re.Match) -> str:
        path = Path(match.group(0))
        return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else path.name

    return ABSOLUTE.sub(local, text)


def as_given(run: trained.Run, group: str, key: str) -> str | None:
    """A config value as the recipe gives it (`${dpo_root:data/toy/train.jsonl}` names
    data/toy/train.jsonl, `${tiny_model:}` stays itself), from the launch's record; None when it was a
    plain value."""
    record = run.dir / paths.RECORD / paths.CONFIG
    value = (
        ((yaml.safe_load(record.read_text()) or {}).get(group) or {}).get(key) if record.exists() else None
    )
    if not isinstance(value, str) or "${" not in value:
        return None
    named = re.fullmatch(r"\$\{(?:dpo_root|asset):(.+)\}", value)  # a file of the project
    return named.group(1) if named else value


def card(run: trained.Run, how: str) -> str:
    """The model card: what was trained on what, its final and best metrics, and how to train it again.
    It names no absolute path of this machine: the base by its hub id (or as the recipe gives it), the
    data as the recipe names it."""
    return portable(_card(run, how))


METHODS = {"dpo": "DPO", "sft": "SFT", "orpo": "ORPO", "cpo": "CPO", "kto": "KTO"}  # by task, for the card


def _card(run: trained.Run, how: str) -> str:
    summary, model = run.summary, run.config["model"]
    base = model["model_name_or_path"]
    local = Path(base).is_absolute() or Path(base).exists()
    named_base = as_given(run, "model", "model_name_or_path") or base
    data_path = as_given(run, "dataset", "path") or run.config["dataset"]["path"] or "a mix"
    overrides = " ".join(o for o in summary.get("overrides", []) if not o.startswith("recipes="))
    launch = f" {summary['launch']}" if summary.get("launch") else ""  # HARDWARE, NPROC, NNODES
    command = f"make train RECIPE={summary['recipe']}{launch}" + (
        f" ARGS={shlex.quote(overrides)}" if overrides else ""
    )
    if run.task == "reward":
        method, tag = "reward modeling", "reward-model"
        detail = "A score head trained by TRL's RewardTrainer (the Bradley-Terry loss on each pair)"
    else:
        train, reference = run.config["train"], summary.get("reference")  # None: a method without one
        loss = train.get("loss_type", ["sigmoid"] if run.task == "dpo" else None)
        method = "SimPO" if run.task == "cpo" and loss == "simpo" else METHODS[run.task]
        tag = method.lower()
        detail = ", ".join(
            [*([f"Loss: {loss}"] if loss else []), *([] if run.task == "sft" else [f"beta {run.beta}"])]
        )
        detail += f"; reference: {reference['strategy']}" if reference else "; no reference model"
    lines = [
        "---",
        *([] if local else [f"base_model: {base}"]),  # the Hub's field takes a hub id only
        "library_name: transformers",
        f"tags: [{tag}, trl, dpo-recipes]",
        "---",
        "",
        f"# {summary['recipe']}: {Path(base).name} trained with {method}",
        "",
        f"Base model: `{named_base}`. Recipe `{summary['recipe']}` from dpo-recipes; {how}. {detail}. "
        f"Run status: {summary['status']}, {summary.get('steps')} steps"
        + (f"; these are the weights of {run.weights.name}." if run.weights != run.dir else "."),
        "",
        "## Data",
        "",
    ]
    for split, counts in summary.get("dataset", {}).items():
        source = summary.get("eval_source") if split == "eval" else data_path
        lines.append(f"- {split} ({source}): {data.counts_line(counts)}")
    final, best, column = summary.get("final", {}), summary.get("best", {}), "final"
    shipped = run.weights == run.dir
    if not shipped:  # a checkpoint's own numbers: the last logged at or before its step
        step = paths.step(run.weights)
        history = json.loads((paths.metrics_dir(run.dir) / paths.HISTORY).read_text())
        final = metrics.summarize([e for e in history if e.get("step", 0) <= step])["final"]
        column = f"at step {step} (these weights)"
    lines += ["", "## Metrics", "", f"| metric | {column} | best (step) |", "| --- | --- | --- |"]
    for name in [p + m for p in ("eval_", "") for m in CARD_METRICS]:
        if name in final:
            top = best.get(name)
            lines.append(
                f"| {name} | {final[name]:.4g} | " + (f"{top['value']:.4g} ({top['step']}) |" if top else "|")
            )
    if "eval" in summary and not shipped:
        lines += ["", "`make eval` judged the run's final weights, not these, so its numbers are not shown."]
    elif "eval" in summary:  # make eval: the answers judged against the reference's
        lines += [
            "",
            "## Judged answers (`make eval`)",
            "",
            *(f"- {line}" for line in judge.lines(summary["eval"])),
        ]
    lines += ["", "![training curves](training_curves.png)", "", "## Reproduce", "", "```", command, "```"]
    return "\n".join(lines) + "\n"


def export(run: trained.Run, out: Path, max_shard_size: str) -> str:
    """Write the model, tokenizer and card into `out` through a staging folder: no partial export."""
    from transformers import AutoTokenizer

    if out.exists():
        raise errors.RunError(
            f"{out} already exists and an export is never overwritten: remove it or pass --out"
        )
    with atomic_path(out, existing="refuse") as staging:
        staging.mkdir()
        how = merged(run, staging, max_shard_size) if run.lora else copied(run, staging)
        AutoTokenizer.from_pretrained(run.weights).save_pretrained(staging)
        curves = paths.metrics_dir(run.dir) / paths.CURVES
        if curves.exists():
            shutil.copy2(curves, staging / curves.name)
        (staging / "README.md").write_text(card(run, how))
    return how


def push(out: Path, repo: str) -> bool:
    """Upload the export to the Hub; False, said why, when it cannot be reached."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo)
    except Exception as err:  # offline mode, no network, no token, no rights: all end here the same way
        print(
            f"not pushed to {repo}: the Hub cannot be reached or refused ({hub.cause(err)}). The export is complete in "
            f"{out}; push it later with `hf upload {repo} {out}`",
            file=sys.stderr,
        )
        return False
    print(f"pushed to https://huggingface.co/{repo}")
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_recipes.after.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run", help="the run dir (or its name under outputs/<recipe>/)")
    parser.add_argument(
        "--out", help="where to write the model (default: <run dir>/export); never overwritten"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument(
        "--force", action="store_true", help="export a stopped run from its newest checkpoint"
    )
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the export to this Hub repo")
    parser.add_argument(
        "--checkpoint", choices=["last", "best"], default="last",
        help="best: the checkpoint with the best judged win rate (a run trained with judge.every)",
    )  # fmt: skip
    options = parser.parse_args(argv)
    try:
        run = trained.open_run(options.run, options.force)
        run = trained.best(run) if options.checkpoint == "best" else run
        out = Path(options.out) if options.out else run.dir / paths.EXPORT
        how = export(run, out, options.max_shard_size)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {run.dir} to {out}: {how}")
    if options.push_to_hub and not push(out, options.push_to_hub):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
