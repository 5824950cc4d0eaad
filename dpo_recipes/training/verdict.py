"""How a run ended, in a few lines: the last thing every run prints (finished, interrupted or failed),
and the head of summary.md beside summary.json. Its numbers are summary.json's."""

import os
from pathlib import Path

from data_prep.io import write_text
from dpo_recipes.rundir import paths

# The numbers a reader looks at first: DPO's (ORPO and CPO log the same), a reward model's, SFT's
HEADLINE = {
    "dpo": ("eval_rewards/accuracies", "eval_rewards/margins"),
    "reward": ("eval_accuracy", "eval_margin"),
    "sft": ("eval_mean_token_accuracy", "eval_loss"),
    "orpo": ("eval_rewards/accuracies", "eval_rewards/margins"),
    "cpo": ("eval_rewards/accuracies", "eval_rewards/margins"),
    "kto": ("eval_rewards/margins", "eval_kl"),
}


def shown(path: Path) -> str:
    """`path` relative to the current directory where it is under it (as a user types it), else whole."""
    path = Path(path).absolute()
    here = Path.cwd()
    return str(path.relative_to(here)) if path.is_relative_to(here) and path != here else str(path)


def _metric(summary: dict, name: str) -> str | None:
    final, best = summary.get("final", {}).get(name), summary.get("best", {}).get(name)
    if final is None:
        return None
    top = f", best {best['value']:.4g} at step {best['step']}" if best else ""
    return f"  {name}: final {final:.4g}{top}"


def _memory(memory: dict | None) -> list[str]:
    if not memory or memory.get("predicted_peak_mb") is None:
        return []
    measured = memory.get("measured_peak_mb")
    said = (
        f", measured {measured / 1024:.2f} GiB ({memory.get('measured_by')})"
        if measured
        else ", not measured"
    )
    return [f"  peak memory: predicted {memory['predicted_peak_mb'] / 1024:.2f} GiB{said}"]


def _next(summary: dict, run_dir: str, resume: str | None) -> list[str]:
    status = summary.get("status", "")
    if status == "finished":
        if summary.get("task") == "reward":  # a reward model scores answers and writes none
            return [
                "next:",
                f'  make eval RUN=<a DPO run> ARGS="--judge {run_dir}"   # judge a policy with it',
                f"  make export RUN={run_dir}",
            ]
        after = [f"  make {verb} RUN={run_dir}" for verb in ("samples", "eval", "export")]
        if summary.get("task") == "sft":  # the usual next stage: DPO from this model, against it
            lora = (Path(run_dir) / "adapter_config.json").exists()
            start = (
                f"reference=sft_adapter reference.path={run_dir}"
                if lora
                else f"model.model_name_or_path={run_dir}"
            )
            after.append(f'  make train RECIPE=<a {"LoRA" if lora else "full"} DPO recipe> ARGS="{start}"')
        return ["next:", *after]
    if resume:
        return [f"resume: {resume}"]
    return []


def lines(summary: dict, run_dir: Path, resume: str | None = None) -> list[str]:
    """The verdict block: status and steps, the headline eval metrics (final and best), the health flags,
    the predicted and measured peak memory, where the files are, and what to run next (`resume`: the
    command that resumes a stopped run)."""
    where = shown(run_dir)
    task = summary.get("task") or "dpo"
    out = [f"== run {summary.get('status')}: {summary.get('recipe')}, {summary.get('steps')} steps =="]
    metrics = [m for m in map(lambda n: _metric(summary, n), HEADLINE.get(task, ())) if m]
    out += metrics or ["  no eval metrics logged (no eval data, or no evaluation step reached)"]
    flags = summary.get("health") or []
    out.append("  health: " + ("; ".join(f["flag"] for f in flags) if flags else "no health flags"))
    out += _memory(summary.get("memory"))
    out.append(f"  files: {where} (metrics, curves and summary in {os.path.join(where, paths.METRICS)})")
    return out + _next(summary, where, resume)


def show(summary: dict, run_dir: Path, resume: str | None = None) -> None:
    """Print the verdict block and write it at the head of summary.md in the run's metrics folder."""
    block = lines(summary, run_dir, resume)
    print("\n" + "\n".join(block), flush=True)
    write_text(
        paths.metrics_dir(run_dir) / paths.SUMMARY_TEXT,
        "# " + block[0].strip("= ") + "\n\n```\n" + "\n".join(block[1:]) + "\n```\n",
    )
