"""The rules a composed config must keep, in two tables of named rules: `RULES` (here) read the config
alone, `MACHINE` (machine.py) this machine and launch. Each is a short function from a `View` (views.py,
the config read once) to a list of problems, testable on a hand-built view; `problems` runs the generic
key/type pass, then every rule.
"""

import dataclasses
import difflib
import math
from pathlib import Path

from data_prep.convert import ANSWERS, Messages
from dpo_recipes.config import precision, reference, secrets
from dpo_recipes.config.machine import MACHINE
from dpo_recipes.config.schema import (
    OURS,
    TASKS,
    TRAINS,
    DatasetSchema,
    ModelArgs,
    SourceSchema,
    TrainArgs,
    cdpo_weights,
    chat_template,
    fits,
    loss_types,
)
from dpo_recipes.config.views import View, on_gpu
from dpo_recipes.sources import hub


# Rules of the config alone: view -> problems.
def template(v: View) -> list[str]:
    if not v.model.get("chat_template"):
        return []
    try:
        chat_template(v.model["chat_template"])
    except FileNotFoundError as err:
        return [f"model.chat_template: {err}"]
    return []


def data_source(v: View) -> list[str]:
    if not v.dataset.path and not v.sources:
        return ["dataset.path: missing; name a file, a saved dataset folder or a hub id (or dataset.sources)"]
    return (
        ["dataset: set path (one source) or sources (a mix), not both"]
        if v.dataset.path and v.sources
        else []
    )


SPELLING = {f.name for f in dataclasses.fields(Messages)}  # the keys of dataset.messages


def mix(v: View) -> list[str]:
    """Each source of a mix, and the keys of one source that a mix would otherwise ignore."""
    problems = []
    for i, source in enumerate(v.sources):
        node = f"dataset.sources[{i}]"
        if not isinstance(source, dict) or not source.get("path"):
            problems.append(f"{node}: a source is a mapping with at least a path")
            continue
        problems += fits(node, source, SourceSchema)
        problems += [f"{node}.messages.{k}: unknown" for k in set(source.get("messages") or {}) - SPELLING]
        if source.get("fraction") is not None and not 0 < source["fraction"] <= 1:
            problems.append(f"{node}.fraction: a share of the source's rows, in (0, 1]")
    default, per_source = DatasetSchema(), {"train_split": "split"}
    for key in ("format", "train_split", "subset", "columns", "messages", "max_samples") if v.sources else ():
        if getattr(v.dataset, key) != getattr(default, key):
            problems.append(
                f"dataset.{key}: a mix reads it from each source; set dataset.sources[i]."
                f"{per_source.get(key, key)} instead (or remove it)"
            )
    return problems


def eval_data(v: View) -> list[str]:
    dataset, option, problems = v.dataset, v.choices.get("dataset"), []
    moved = v.shipped and (v.sources or dataset.path != v.shipped.get("path"))
    for key in ("eval_path", "eval_split"):  # an eval source of the option's own data, not of the new path
        value = getattr(dataset, key)
        if moved and value and value == v.shipped.get(key):
            data = "dataset.sources" if v.sources else f"dataset.path={dataset.path}"
            problems.append(
                f"dataset.{key}: {value} belongs to dataset={option}, not to {data}; name your eval data "
                f"(dataset.{key}=...), or hold out part of yours: dataset.{key}=null dataset.eval_size=0.1 "
                "(a fraction, or a row count)"
            )
    if v.sources and dataset.eval_split:
        problems.append(
            "dataset.eval_split: a mix has no one split to take; use dataset.eval_path or eval_size"
        )
    if dataset.eval_path and dataset.eval_split:
        problems.append("dataset: set eval_path (a separate file) or eval_split (a split of path), not both")
    if isinstance(dataset.eval_size, int | float) and dataset.eval_size < 0:
        problems.append("dataset.eval_size: must be a fraction (< 1) or a row count (>= 1)")
    unknown = sorted(set(dataset.messages or {}) - SPELLING)
    return problems + [
        f"dataset.messages.{k}: unknown; the keys are {', '.join(sorted(SPELLING))}" for k in unknown
    ]


def scale(v: View) -> list[str]:
    problems, option = [], v.choices.get("hardware", v.hardware.engine)
    if v.hardware.engine in ("deepspeed", "fsdp") and v.train.get("use_cpu"):
        problems.append(
            f"hardware={option} shards on GPUs only: with train.use_cpu accelerate would run plain data "
            "parallel instead; on CPU use hardware=cpu NPROC=<processes>"
        )
    if (
        v.hardware.engine == "deepspeed"
        and v.hardware.device == "cpu"
        and v.train.get("ddp_backend") != "gloo"
    ):
        problems.append(
            f"hardware={option} hardware.device=cpu: DeepSpeed on CPU processes (its CPU accelerator, as the "
            "tests run it) needs train.ddp_backend=gloo, or accelerate counts one process"
        )
    reentrant = (v.train.get("activation_checkpointing_kwargs") or {}).get("use_reentrant")
    if (
        v.hardware.zero_stage == 3
        and v.lora
        and v.train.get("activation_checkpointing")
        and reentrant is False
    ):
        problems.append(
            "ZeRO-3 with LoRA and gradient checkpointing needs use_reentrant=true (TRL issue 2514)"
        )
    return problems


def run(v: View) -> list[str]:
    """run.resume: auto, never or a checkpoint. run.name (RUN=): a dir under outputs/<recipe>/, where a
    path (a run dir as make samples takes it, an absolute one, ..) would nest a new run."""
    found, resume, name = [], v.run.resume, str(v.run.name or "")
    if resume not in ("auto", "never") and not (Path(str(resume)) / "trainer_state.json").is_file():
        found.append(f"run.resume: {resume!r} is not auto, never or a checkpoint dir with trainer_state.json")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts:
        found.append(f"run.name: {name!r} is a path; RUN names a dir under outputs/<recipe>/")
    elif parts[:1] == ("outputs",) and len(parts) > 2:
        found.append(f"run.name: {name!r} is a run dir; make train takes its name: RUN={'/'.join(parts[2:])}")
    return found


def beta(v: View) -> list[str]:
    """At 0 or below a loss drops the preference (ORPO's: plain SFT) or reverses it; TRL trains on."""
    value = v.train.get("beta")
    if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
        return [f"train.beta: {value} leaves the preference out of the loss or reverses it; set it above 0"]
    return []


LABEL_SMOOTHING_LOSSES = {"robust", "exo_pair"}  # the only TRL 1.16 losses that read label_smoothing


def losses(v: View) -> list[str]:
    if v.task != "dpo":  # another task's loss_type is its own config's, checked against it
        return []
    problems, known = [], loss_types()
    for loss in v.losses:
        if loss not in known:
            close = difflib.get_close_matches(str(loss), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                f"train.loss_type: unknown loss {loss!r}; {hint}TRL has {', '.join(sorted(known))}"
            )
    weights = v.train.get("loss_weights")
    if weights is not None and len(weights) != len(v.losses):
        problems.append(
            f"train.loss_weights: {len(weights)} weights for {len(v.losses)} loss {v.losses}; switch losses "
            f"with loss=<option>, which sets both (loss={v.losses[0]}), or set both keys"
        )
    smoothing = v.train.get("label_smoothing")
    if smoothing and not set(v.losses) & LABEL_SMOOTHING_LOSSES:
        problems.append(
            f"train.label_smoothing: ignored by loss {v.losses} (TRL 1.16 reads it only in robust and exo_pair; "
            "the label-smoothed sigmoid of cDPO is loss=cdpo); use loss=robust for noisy labels, or remove it"
        )
    if v.choices.get("loss") == "cdpo" and v.losses == ["robust", "sigmoid"] and weights is not None:
        right = cdpo_weights(smoothing or 0.0)
        if not all(math.isclose(a, b, abs_tol=1e-9) for a, b in zip(weights, right, strict=False)):
            problems.append(
                f"train.loss_weights: {weights} is not cDPO at label_smoothing {smoothing} (that is {right}); "
                "leave loss_weights out: loss=cdpo derives them from train.label_smoothing"
            )
    return problems


def reference_strategy(v: View) -> list[str]:
    strategy = reference.resolve(v.reference.strategy, v.lora)
    if strategy not in reference.STRATEGIES:  # an unknown one is reported with the choices
        return []
    return reference.problems(strategy, v.reference.path, v.train, v.lora)


def local_paths(v: View) -> list[str]:
    paths = {
        "model.model_name_or_path": v.model.get("model_name_or_path"),
        "reference.path": v.reference.path,
    }
    paths |= {f"dataset.{k}": getattr(v.dataset, k) for k in ("path", "eval_path")}
    paths |= {
        f"dataset.sources[{i}].path": s.get("path") for i, s in enumerate(v.sources) if isinstance(s, dict)
    }
    return [p for key, value in paths.items() if value and (p := hub.missing_local(str(value), key))]


def lora_targets(v: View) -> list[str]:
    targets = v.model.get("lora_target_modules") or []
    if v.lora and "lm_head" in ([targets] if isinstance(targets, str) else targets):
        return [
            "model.lora_target_modules: lm_head: TRL's fused log-prob head reads the base weight and "
            "ignores an adapter there; remove it (all-linear leaves lm_head out)"
        ]
    return []


# Attention implementations that keep packed sequences apart: transformers derives the mask from the
# restarting position ids (eager, flex) or runs a varlen kernel (flash); sdpa attends sequence by sequence
# (trainer.by_segment). None is transformers' default (sdpa where the model has it).
PACKABLE = (None, "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def padding_free(v: View) -> list[str]:
    attention = v.model.get("attn_implementation")
    if v.train.get("padding_free") and attention not in PACKABLE:
        return [
            f"train.padding_free: attention {attention!r} would let packed sequences attend to each "
            f"other; set model.attn_implementation to one of {', '.join(map(str, PACKABLE[1:]))}, or "
            "train.padding_free=false"
        ]
    return []


# A shared-prompt sequence needs its own mask (its rejected answer sees the prompt, not the chosen answer):
# a 4D mask under eager attention, a block mask under flex attention, attention by segment under sdpa
# (its rejected answer against the prompt's keys and its own); flash kernels take none.
SHAREABLE = (None, "sdpa", "eager", "flex_attention")


def share_prompt(v: View) -> list[str]:
    attention = v.model.get("attn_implementation")
    if v.train.get("share_prompt") and attention not in SHAREABLE:
        return [
            f"train.share_prompt: attention {attention!r} cannot take the mask that keeps a pair's "
            f"rejected answer from its chosen one; set model.attn_implementation to one of "
            f"{', '.join(map(str, SHAREABLE[1:]))}, or train.share_prompt=false"
        ]
    return []


def flex_on_cpu(v: View) -> list[str]:
    if v.model.get("attn_implementation") != "flex_attention" or on_gpu(v.hardware.device, v.train):
        return []
    return [
        "model.attn_implementation=flex_attention: PyTorch's flex attention has no backward pass on CPU; "
        "set model.attn_implementation=sdpa to train here"
    ]


def judge(v: View) -> list[str]:
    if v.judge.kind != "none" and not v.judge.path:
        return [f"judge.path: judge.kind={v.judge.kind} needs the judge model (a local folder or a hub id)"]
    every, found = v.judge.every, []
    if not every:
        return []
    if every < 0 or v.judge.prompts < 1 or v.judge.max_new_tokens < 1:
        found.append(
            "judge.every, judge.prompts, judge.max_new_tokens: counts, at least 1 (judge.every=0: off)"
        )
    if v.judge.kind == "none":
        found.append("judge.every: judging while training needs a judge: judge=<option> (conf/judge/)")
    steps = v.train.get("eval_steps") or v.train.get("logging_steps") or 500
    d = v.dataset
    if v.train.get("eval_strategy", "no") != "steps" or not (d.eval_path or d.eval_split or d.eval_size):
        found.append("judge.every: judging happens at evaluations: train.eval_strategy=steps with eval data")
    elif every % steps:
        found.append(
            f"judge.every={every}: a multiple of train.eval_steps={steps}, or no evaluation falls on it"
        )
    if v.hardware.engine == "fsdp" or v.hardware.zero_stage == 3:
        found.append(
            f"judge.every: hardware={v.choices.get('hardware')} shards the weights; generation while "
            "training needs a whole model in one process: judge after training (make eval)"
        )
    return found


def task(v: View) -> list[str]:
    if v.task not in TASKS:
        return [f"task: {v.task!r} is none of {', '.join(TASKS)}"]
    if v.task == "dpo":
        return []
    found, trains = [], f"task={v.task} {TRAINS[v.task]}"
    if v.choices.get("loss"):
        found.append(
            f"loss={v.choices['loss']}: {trains}, which takes no DPO loss: drop the option "
            "(`override /loss: null` in the recipe, `~loss` on the command line)"
        )
    if v.choices.get("reference", "auto") != "auto" and v.task != "kto":
        found.append(
            f"reference={v.choices['reference']}: {trains}, with no reference model: drop the option (a DPO "
            "run after it takes this run's output as its reference.path)"
        )
    if v.task not in ("reward", "kto") and v.model.get("load_in_4bit"):  # these take no quantization config
        found.append(
            f"model.load_in_4bit: task={v.task} trains LoRA on bf16 weights here; set model.load_in_4bit=false"
        )
    if v.task == "reward" and v.lora and v.model.get("lora_task_type", "CAUSAL_LM") != "SEQ_CLS":
        found.append(
            "model.lora_task_type: a LoRA reward model needs SEQ_CLS, or its score head is neither trained nor saved"
        )
    if v.judge.every:
        found.append(
            f"judge.every: judges a DPO policy against its reference; with task={v.task} set judge.every=0"
        )
    return found


def unpaired(v: View) -> list[str]:
    """KTO learns from unpaired rows (prompt, completion, label): thumbs or instruction data, or pairs
    split with dataset.unpair; SFT from either; every other task from pairs."""
    formats = {s.get("format", "trl") for s in v.sources if isinstance(s, dict)} or {v.dataset.format}
    paired, unpaired = sorted(formats - set(ANSWERS)), sorted(formats & set(ANSWERS))
    if v.task == "kto" and not v.dataset.unpair and paired:
        return [
            f"dataset.format: task=kto learns from unpaired rows, and format {paired[0]!r} gives pairs: set "
            "dataset.unpair=true (each pair becomes a desirable and an undesirable row), or give thumbs-up/down "
            "rows (format: thumbs; `make prep ... ARGS=--unpaired` writes them from pairs)"
        ]
    if v.dataset.unpair and unpaired:
        return [f"dataset.unpair: format {unpaired[0]} is unpaired already; remove dataset.unpair"]
    if v.task != "kto" and v.dataset.unpair:
        return [f"dataset.unpair: only task=kto learns from unpaired rows; with task={v.task} remove it"]
    if v.task not in ("kto", "sft") and unpaired:
        return [
            f"dataset.format: {unpaired[0]} gives unpaired rows, which task={v.task} cannot learn from: use "
            "task=kto (or task=sft, on the answers rated up), or paired data"
        ]
    kl = v.task == "kto" and v.train.get("loss_type", "kto") != "apo_zero_unpaired"
    if kl and v.train.get("per_device_train_batch_size", 1) <= 1:  # as TRL's KTOTrainer refuses it
        return [
            "train.per_device_train_batch_size: KTO estimates its KL term from the other rows of each "
            "micro-batch, so it needs 2 or more (lower gradient_accumulation_steps to keep the batch)"
        ]
    return []


def memory(v: View) -> list[str]:
    found, hardware = [], v.hardware
    if hardware.memory_gb is not None and hardware.memory_gb <= 0:
        found.append(
            f"hardware.memory_gb: {hardware.memory_gb} is no card's memory; give GiB per GPU, e.g. 24 or 80"
        )
    if hardware.micro_batch == "auto" and v.task != "dpo":
        found.append(
            f"hardware.micro_batch=auto: memory is predicted for DPO runs only; with task={v.task} set "
            "train.per_device_train_batch_size"
        )
    return found


RULES = {
    "template": template,
    "data_source": data_source,
    "mix": mix,
    "eval_data": eval_data,
    "secrets": lambda v: secrets.found(v.raw),
    "scale": scale,
    "precision": precision.problems,
    "run": run,
    "losses": losses,
    "beta": beta,
    "reference": reference_strategy,
    "local_paths": local_paths,
    "lora_targets": lora_targets,
    "padding_free": padding_free,
    "share_prompt": share_prompt,
    "flex_on_cpu": flex_on_cpu,
    "judge": judge,
    "task": task,
    "unpaired": unpaired,
    "memory": memory,
}


def problems(v: View, machine: bool = True) -> list[str]:
    """The generic pass, then every rule. A rule may trip over a value the generic pass already refused;
    then that refusal stands for it."""
    found = fits("train", v.train, TASKS.get(v.task, TrainArgs)) + fits("model", v.model, ModelArgs)
    found += [p for name, cls in OURS.items() for p in fits(name, v.nodes[name], cls)]
    for rule in [*RULES.values(), *(MACHINE.values() if machine else ())]:
        try:
            found += rule(v)
        except (TypeError, ValueError, AttributeError, KeyError):
            if not found:
                raise
    return found
