"""Will it fit? Before any weight loads: a DPO run's predicted peak accelerator memory (trace.py,
estimates.py, from the model's config.json alone) against its budget, the micro-batch
`hardware.micro_batch=auto` picks, and the fixes that would make a run fit. Every run also measures its
real peak (measuring.py) and records it beside the prediction in summary.json."""

import dataclasses
from dataclasses import dataclass

import torch

from dpo_recipes import errors
from dpo_recipes.errors import TooBig
from dpo_recipes.memory.estimates import MARGIN, Estimate, predict
from dpo_recipes.memory.shapes import NO_REFERENCE, Shape, counted_elsewise, prep_report, shape_of
from dpo_recipes.memory.trace import MB


def budget_mb(hardware) -> float | None:
    """The memory a run may use: hardware.memory_gb (planning for another machine), else the visible
    GPU's, for a GPU run; None for a CPU run without memory_gb."""
    if hardware.memory_gb:
        return hardware.memory_gb * 1024
    if hardware.device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / MB
    return None


def _fits(shape: Shape, budget: float) -> tuple[bool, Estimate]:
    estimate = predict(shape)
    return estimate.peak_mb <= budget, estimate


def largest_batch(shape: Shape, budget: float, effective: int) -> tuple[int, Estimate] | None:
    """The largest micro-batch dividing the effective batch `effective` that fits, with its estimate. The
    peak grows about linearly with the micro-batch: the first guess comes from micro-batches 1 and 2."""
    one = predict(dataclasses.replace(shape, batch=1))
    if one.peak_mb > budget:
        return None
    slope = max(predict(dataclasses.replace(shape, batch=2)).peak_mb - one.peak_mb, 1e-3)
    guess = 1 + (budget - one.peak_mb) / slope
    for batch in sorted(
        (b for b in range(1, effective + 1) if effective % b == 0 and b <= guess), reverse=True
    ):
        ok, estimate = _fits(dataclasses.replace(shape, batch=batch), budget)
        if ok:
            return batch, estimate
    return 1, one


@dataclass(frozen=True)
class Fix:
    """A change that would make a run fit: its kind, the overrides to type, and the run's estimate with it."""

    kind: str  # batch, reference, checkpointing, shard, quantize, length
    text: str
    estimate: Estimate


def fixes(shape: Shape, budget: float, effective: int) -> list[Fix]:
    """Changes that would make a run fit, each with its estimate: those that keep the results first (a
    smaller micro-batch, precomputed reference log-probs, checkpointing), then sharding over GPUs, 4-bit
    weights, shorter sequences."""
    found = []
    if shape.batch > 1 and (best := largest_batch(shape, budget, effective)) and best[0] < shape.batch:
        b = best[0]
        text = f"train.per_device_train_batch_size={b} train.gradient_accumulation_steps={effective // b}"
        found.append(Fix("batch", text, best[1]))
    candidates = []  # (kind, text, change): the first shard that fits and the longest length only
    if shape.reference not in ("precomputed", "none"):
        candidates.append(("reference", "reference=precomputed", dict(reference="precomputed")))
    if not shape.checkpointing:
        candidates.append(("checkpointing", "train.activation_checkpointing=true", dict(checkpointing=True)))
    # DeepSpeed stores the weights in the compute dtype (its masters are fp32), whatever they loaded as
    stored = shape.mixed if shape.mixed is not None else shape.dtype
    for n in (2, 4, 8):
        shard = dict(engine="deepspeed", zero_stage=3, processes=n, dtype=stored, offload=False)
        candidates.append(("shard", f"hardware=zero3 NPROC={n}", shard))
    if not shape.four_bit and shape.cuda:
        reference = "none" if shape.reference == "none" else "adapter"
        quantized = dict(four_bit=True, lora=shape.lora or _default_lora(), reference=reference)
        text = "QLoRA: model=qwen2_5_7b_qlora or model.use_peft=true model.load_in_4bit=true"
        candidates.append(("quantize", text, quantized))
    for length in (shape.length * 3 // 4, shape.length // 2, shape.length // 4):
        candidates.append(("length", f"train.max_length={length}", dict(length=length)))
    done = set()
    for kind, text, change in candidates:
        if kind in done:
            continue
        ok, estimate = _fits(dataclasses.replace(shape, **change), budget)
        if ok:
            found.append(Fix(kind, text, estimate))
            if kind in ("shard", "length"):
                done.add(kind)  # the fewest GPUs, the longest sequences
    return found


def _default_lora():
    from peft import LoraConfig

    return LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")


@dataclass(frozen=True)
class Verdict:
    """What the pre-flight found: summary.json's "memory" record, the lines to print, and the micro-batch
    and accumulation `hardware.micro_batch=auto` picked (None: the run's own)."""

    record: dict | None
    lines: list[str]
    batch: tuple[int, int] | None = None


def preflight(built, processes: int | None = None, **changes) -> Verdict:
    """Before any weight loads: the predicted peak of a DPO, KTO, ORPO or CPO/SimPO run, the micro-batch
    `hardware.micro_batch=auto` picks, and the verdict against its budget (budget_mb); raises TooBig,
    listing the fixes, for a run predicted not to fit. `changes`: Shape fields to plan with instead of the
    run's. A KTO step is a DPO step on half as many pairs: its rows, through the same fused head, each
    against the reference, and a KL pass under no_grad that holds no activations past its own layer. An
    ORPO or CPO step has no reference and holds the whole vocabulary's logits (shapes.Shape.head)."""
    if built.task not in ("dpo", "kto", *NO_REFERENCE):
        return Verdict(None, [])
    if built.task == "kto":
        changes.setdefault("batch", -(-built.args.per_device_train_batch_size // 2))
    args, budget = built.args, budget_mb(built.hardware)
    try:
        shape = shape_of(built, processes=processes, **changes)
        predict(shape)
    except errors.Unreachable:
        raise
    except Exception as err:  # an architecture the trace cannot run: the run goes on unpredicted
        return Verdict(None, [f"note: peak memory not predicted ({type(err).__name__}: {str(err)[:200]})"])
    effective = shape.batch * args.gradient_accumulation_steps
    lines, batch = [], None
    if built.hardware.micro_batch == "auto":
        best = largest_batch(shape, budget, effective) if budget else None
        if best:
            batch = best[0], effective // best[0]
            shape = dataclasses.replace(shape, batch=best[0])
        lines.append(
            f"hardware.micro_batch=auto: micro-batch {shape.batch} x accumulation "
            f"{effective // shape.batch}" + ("" if budget else " as set (no budget: see hardware.memory_gb)")
        )
    estimate = predict(shape)
    report = prep_report(built.dataset)
    if report and "token_lengths" in report:
        why = counted_elsewise(report, built.model.model_name_or_path, built.model.chat_template)
        if why:
            lines.append(f"note: the token counts of {built.dataset.path}.report.json are not used: {why}")
    if built.judge.every and built.judge.kind != "none" and not shape.judge_bytes:
        lines.append(f"note: the judge's weights are not counted: no config.json for {built.judge.path} here")
    where = f"per GPU ({shape.processes} x {built.hardware.engine})" if shape.cuda else "in this process"
    micro = f"{args.per_device_train_batch_size} rows" if built.task == "kto" else shape.batch
    lines += [
        f"predicted peak memory {where}: {estimate.peak_mb / 1024:.2f} GiB (micro-batch {micro}, "
        f"{shape.length} tokens a sequence, reference {shape.reference})",
        *estimate.lines(),
    ]
    record = {
        "predicted_peak_mb": estimate.peak_mb,
        "budget_mb": round(budget) if budget else None,
        "micro_batch": shape.batch,
        "sequence_length": shape.length,
        "breakdown_mb": {name: round(mb, 1) for name, mb in estimate.parts.items()},
    }
    if budget is None:
        return Verdict(
            record,
            [*lines, "no memory budget on this machine: add hardware.memory_gb=N for a verdict"],
            batch,
        )
    gib = f"{budget / 1024:.0f} GiB"
    if estimate.peak_mb > budget * (1 + MARGIN):
        found = fixes(shape, budget, effective)
        raise TooBig(
            "\n".join(
                [
                    f"the run does not fit in {gib}: predicted {estimate.peak_mb / 1024:.1f} GiB; it would fit with"
                    + (":" if found else " none of the usual fixes: use a smaller model or a larger card"),
                    *(f"  {fix.text}  ({fix.estimate.peak_mb / 1024:.1f} GiB)" for fix in found),
                    *lines,
                ]
            )
        )
    if estimate.peak_mb > budget * (1 - MARGIN):
        room = ["train.activation_checkpointing=true"] if not shape.checkpointing else []
        room += ["a smaller micro-batch"] if shape.batch > 1 else ["a shorter train.max_length"]
        lines.append(
            f"warning: within {MARGIN:.0%} of {gib} (the prediction's error): it may run out of memory; "
            f"{' or '.join(room)} leaves room"
        )
    else:
        lines.append(f"fits in {gib} ({1 - estimate.peak_mb / budget:.0%} to spare)")
    if built.hardware.micro_batch != "auto" and (best := largest_batch(shape, budget, effective)):
        lines.append(
            f"largest micro-batch that fits, same effective batch {effective}: {best[0]} x accumulation "
            f"{effective // best[0]} ({best[1].peak_mb / 1024:.1f} GiB); hardware.micro_batch=auto picks it"
        )
    return Verdict(record, lines, batch)
