"""A trained run loaded back for `export` and `samples`: its summary, the folder its weights are in, and
the policy and reference models as the run's reference strategy had them."""

import json
from dataclasses import dataclass
from pathlib import Path

from trl import DPOConfig

from dpo_recipes.config.schema import ModelArgs
from dpo_recipes.errors import RunError
from dpo_recipes.rundir import paths
from dpo_recipes.sources import hub


@dataclass(frozen=True)
class Run:
    dir: Path
    summary: dict
    weights: Path  # the run dir for a finished run; its newest complete checkpoint for a stopped one

    @property
    def config(self) -> dict:
        return self.summary["config"]

    @property
    def lora(self) -> bool:
        """What this run trained, from its own record: files an earlier run left cannot change it."""
        return bool(self.config["model"].get("use_peft"))

    @property
    def task(self) -> str:
        return self.summary.get("task") or "dpo"  # runs from before task=reward trained DPO

    @property
    def generates(self) -> "Run":
        """This run, if it trained a model that writes answers; a reward model's run says what to do."""
        if self.task == "reward":
            raise RunError(
                f"{self.dir} holds a reward model, which scores answers and writes none: judge a DPO run "
                f'with it, `make eval RUN=<a DPO run> ARGS="--judge {self.weights}"` (a LoRA one exported first)'
            )
        return self

    @property
    def beta(self) -> float:
        return self.config["train"].get("beta", DPOConfig.beta)  # TRL's default where the run set none

    @property
    def seed(self) -> int:
        return self.config["train"].get("seed", DPOConfig.seed)

    @property
    def dtype(self) -> str:
        return self.config["model"].get("dtype") or "auto"

    def flags(self, revision: str | None = None) -> dict:
        """How the run loaded its models: the revision, remote code, safetensors only (or its opt-out)."""
        train = self.config["train"]
        safetensors = (train.get("model_init_kwargs") or {}).get("use_safetensors", True)
        return {
            "revision": revision,
            "trust_remote_code": bool(train.get("trust_remote_code")),
            "use_safetensors": safetensors,
        }


def open_run(run_dir: str | Path, force: bool = False) -> Run:
    """The run in `run_dir` (or named so under ./outputs/<recipe>/); one that did not finish only with
    `force`, from its newest complete checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        named = sorted(Path("outputs").glob(f"*/{run_dir.name}"))  # where train writes: the current dir
        run_dir = named[0] if len(named) == 1 else run_dir
    summary_file = paths.summary_file(run_dir)
    if not summary_file.exists():
        raise RunError(
            f"{run_dir}: no dpo_metrics/summary.json, so not a run dir (or one that never trained)"
        )
    summary = json.loads(summary_file.read_text())
    if summary.get("status") == "finished":
        return Run(run_dir, summary, run_dir)
    done = [c for c in paths.checkpoints(run_dir) if paths.complete(c)]
    if not force or not done:
        hint = f"; --force uses its newest checkpoint, {done[-1].name}" if done else ""
        raise RunError(
            f"{run_dir}: the run is {summary.get('status')!r}, not finished: resume it first{hint}"
        )
    print(f"note: {run_dir} is {summary.get('status')!r}: using {done[-1]}")
    return Run(run_dir, summary, done[-1])


JUDGED = "eval_judge/win_rate"  # logged by judge.every (dpo_recipes/after/judging.py)


def best(run: Run) -> Run:
    """The run at its best judged win rate: the checkpoint saved at that step (the trainer keeps it
    through save_total_limit), or the run's own weights when the last step was the best."""
    found = run.summary.get("best", {}).get(JUDGED)
    if found is None:
        raise RunError(
            f"{run.dir}: no judged win rate logged: --checkpoint best needs a run trained with judge.every=N"
        )
    step = found["step"]
    if step == run.summary.get("steps") and run.weights == run.dir:
        return run
    checkpoint = paths.checkpoint(run.dir, step)
    if not paths.complete(checkpoint):
        raise RunError(
            f"{run.dir}: the best judged win rate ({found['value']:.2f}) was at step {step}, which has no "
            "checkpoint: train with train.save_steps dividing judge.every"
        )
    print(f"the best judged win rate, {found['value']:.2f}, was at step {step}: using {checkpoint}")
    return Run(run.dir, run.summary, checkpoint)


def load(path: str, dtype: str, key: str, flags: dict, quantization=None, task: str = "dpo"):
    import torch
    import transformers

    auto = "AutoModelForSequenceClassification" if task == "reward" else "AutoModelForCausalLM"
    with hub.fetching("model", path, key):
        model = getattr(transformers, auto).from_pretrained(
            path, dtype=getattr(torch, dtype, "auto"), quantization_config=quantization, **flags,
            **({"num_labels": 1} if task == "reward" else {}),  # one score, as RewardTrainer made it
        )  # fmt: skip
    return (model if quantization else model.to("cuda" if torch.cuda.is_available() else "cpu")).eval()


def base(run: Run, dtype: str | None = None, as_trained: bool = False):
    """The model the run started from, at the run's revision, in `dtype` (default: the run's
    `model.dtype`); `as_trained`: quantized as the run had it (bitsandbytes), as its reference was."""
    model, quantization = run.config["model"], None
    if as_trained and (model.get("load_in_4bit") or model.get("load_in_8bit")):
        from trl import get_quantization_config

        quantization = get_quantization_config(ModelArgs(**model))
    flags = run.flags(model.get("model_revision"))
    path = model["model_name_or_path"]
    return load(path, dtype or run.dtype, "model.model_name_or_path", flags, quantization, run.task)


def policy(run: Run):
    """The trained model: the base (as trained) with the run's adapter, or the run's own weights."""
    if not run.lora:
        return load(str(run.weights), run.dtype, "RUN", run.flags(), task=run.task)
    from peft import PeftModel

    return PeftModel.from_pretrained(base(run, as_trained=True), run.weights).eval()


class AdapterOff:
    """The policy with its adapter disabled: the base, as the `adapter` strategy's reference is."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model.generate(*args, **kwargs)


def reference(run: Run, trained):
    """The reference the run trained against: a `reference.path` model (with the SFT adapter for
    `sft_adapter`), the policy with its adapter off, or the base model; for a method without a
    reference (ORPO, SimPO, CPO, SFT), the model it started from."""
    held = run.summary.get("reference") or {"strategy": "base", "path": None}
    strategy, path = held["strategy"], held["path"]
    if strategy == "path":
        revision = (run.config.get("reference") or {}).get("revision")
        return load(path, run.dtype, "reference.path", run.flags(revision))
    if strategy == "sft_adapter":
        from peft import PeftModel

        return PeftModel.from_pretrained(base(run, as_trained=True), path).eval()
    return AdapterOff(trained) if run.lora else base(run, as_trained=True)
