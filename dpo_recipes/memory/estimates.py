"""A run's predicted peak from its traces, plus what a CPU trace cannot show, by formula: 4-bit weights,
each engine's masters and sharding (DeepSpeed's as its own estimator counts them), a judge's weights and
generation cache under judge.every, the CUDA allocator's cache and context."""

import copy
from dataclasses import dataclass
from unittest import mock

import torch

from dpo_recipes.memory.shapes import Shape
from dpo_recipes.memory.trace import KINDS, MB, _quantized_linears, trace

_PREDICTED: dict = {}  # shape's content -> (shape, estimate): a plan asks for the same shape several times
_COUNTED: dict = {}  # the model's content -> its Counts: shapes that differ in batch or length share them


FP32 = 4


# The error measured on CPU is within 10% (tests/memory/test_memory.py): within it of the budget, a warning.
MARGIN = 0.10
# CUDA only: the caching allocator's reserve over its allocated peak, and the context and cuBLAS
# workspaces that no tensor accounts for.
ALLOCATOR_SHARE = 0.08
CUDA_CONTEXT_MB = 1024
NF4_BYTES = 0.5 + 0.016  # a 4-bit weight and its double-quantized block scales, bytes per weight


@dataclass(frozen=True)
class Counts:
    """The policy's weights (elements, and bytes as loaded), those trained, the largest module's own
    weights (DeepSpeed's "largest layer"), and a separate reference's bytes."""

    weights: int
    weight_bytes: int
    trainable: int
    trainable_bytes: int
    largest: int
    reference_bytes: int


def _counts(shape: Shape) -> Counts:
    """The shape's model counted once, however many batches and lengths are predicted for it."""
    fields = ("config", "reference_config", "dtype", "lora", "reference")
    key = tuple(_content(getattr(shape, f)) for f in fields)
    if key not in _COUNTED:
        _COUNTED[key] = _counted(shape)
    return _COUNTED[key]


def _counted(shape: Shape) -> Counts:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    def build(config):
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=shape.dtype)

    model = build(shape.config)
    if shape.lora is not None:
        model = get_peft_model(model, copy.deepcopy(shape.lora))
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    separate = shape.reference in ("copy", "path")
    reference = build(shape.reference_config or shape.config) if separate else None
    return Counts(
        weights=sum(p.numel() for p in params),
        weight_bytes=sum(p.numel() * p.element_size() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        trainable_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        largest=largest,
        reference_bytes=sum(p.numel() * p.element_size() for p in reference.parameters()) if reference else 0,
    )


@dataclass(frozen=True)
class Estimate:
    """A predicted peak in MB and its parts, largest first."""

    peak_mb: float
    parts: dict[str, float]

    def lines(self) -> list[str]:
        width = max(map(len, self.parts))
        return [f"  {name:<{width}}  {mb / 1024:8.2f} GiB" for name, mb in self.parts.items()]


def _content(value):
    """A field of a shape by its content: a config or the run's arguments as their JSON, else its repr."""
    if isinstance(value, int | float | str | torch.dtype | None):
        return value
    return value.to_json_string() if hasattr(value, "to_json_string") else repr(value)


def predict(shape: Shape) -> Estimate:
    """The step's peak for `shape`; a shape equal in content to one predicted before is not traced again."""
    key = tuple(_content(v) for v in vars(shape).values())
    if key not in _PREDICTED:
        # Under a DeepSpeed ZeRO-3 launch transformers builds every model inside deepspeed.zero.Init, which
        # partitions weights as they are made: the traced models are built whole, as one process holds them
        with mock.patch("transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref", None):
            _PREDICTED[key] = shape, _predict(shape)
    return _PREDICTED[key][1]


def _predict(shape: Shape) -> Estimate:
    """The step's peak, from traces of two and three decoder layers (the whole model where it has at
    most three), with the formula terms the trace cannot show."""
    layers = shape.config.get_text_config().num_hidden_layers
    if layers <= 3:
        phases = trace(shape, layers)
    else:  # with two layers, the backward before the first layer holds a whole layer's like any depth
        two, three = trace(shape, 2), trace(shape, 3)
        phases = [
            {k: a.get(k, 0) + (layers - 2) * (b.get(k, 0) - a.get(k, 0)) for k in {*a, *b}}
            for a, b in zip(two, three, strict=True)
        ]
    peak = max(phases, key=lambda kinds: kinds["Total"])
    parts: dict[str, float] = {}
    counts = _counts(shape)
    separate = counts.reference_bytes
    for kind, size in peak.items():
        if kind != "Total" and size > 0:
            name = KINDS.get(kind, kind)
            parts[name] = parts.get(name, 0) + size / MB
    held = parts.pop("weights", 0)  # policy (and adapter), and a separate reference
    parts["policy weights"] = held - separate / MB
    if separate:
        parts["reference weights"] = separate / MB
    if shape.four_bit:  # loaded as 4-bit, used one layer at a time in the compute dtype
        numel, largest = _quantized_linears(shape)
        parts["policy weights"] -= numel * (shape.dtype.itemsize - NF4_BYTES) / MB
        temporaries = "temporaries (log-prob head, backward)"
        parts[temporaries] = parts.get(temporaries, 0) + largest * shape.dtype.itemsize / MB
    _shard(parts, shape, counts)
    if shape.judge_bytes:
        parts["judge weights (judge.every)"] = shape.judge_bytes / MB
    if shape.generation_tokens:  # held while judging, not beside a step's gradients: counted as if it were
        text = shape.config.get_text_config()
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        per_token = text.num_hidden_layers * 2 * heads * head_dim * (shape.mixed or shape.dtype).itemsize
        parts["generation cache (judge.every)"] = shape.generation_tokens * per_token / MB
    if shape.cuda:
        parts["CUDA allocator and context"] = sum(parts.values()) * ALLOCATOR_SHARE + CUDA_CONTEXT_MB
    parts = dict(sorted(((k, v) for k, v in parts.items() if v > 0.5), key=lambda kv: -kv[1]))
    return Estimate(round(sum(parts.values()), 1), parts)


def _shard(parts: dict, shape: Shape, counts: Counts) -> None:
    """Per-GPU parts as each engine holds them over `processes` GPUs (the trace is one process's):
    DDP adds gradient buckets. DeepSpeed under mixed precision runs bf16 weights and gradients with fp32
    master weights, gradients and AdamW states in its optimizer, as its own estimator counts them: ZeRO-2
    keeps the bf16 weights whole and shards the rest, bf16 gradients too (2 + 18/N bytes a parameter);
    ZeRO-3 shards everything (18/N) and gathers 4 bytes per weight of the largest module; the reference is
    sharded under ZeRO-3 only. FSDP2 under accelerate's mixed precision keeps the trained weights in fp32
    (its master weights), shards weights, gradients and states, and gathers two layers in bf16.
    Offloading keeps weights, masters, gradients and optimizer states in CPU memory."""
    n, t, mixed = shape.processes, counts.trainable, shape.mixed is not None
    if shape.engine == "ddp" and n > 1:
        parts["gradient buckets (DDP)"] = parts.get("gradients", 0)
    if shape.engine not in ("deepspeed", "fsdp"):
        return
    stage = 3 if shape.engine == "fsdp" else shape.zero_stage or 0
    # The trace's optimizer states are in the trained weights' loaded dtype; these engines keep them in fp32
    states = parts.get("optimizer states", 0)
    if mixed:
        states *= FP32 / max(1, counts.trainable_bytes / max(1, t))
    if shape.engine == "deepspeed":
        half = shape.mixed.itemsize if mixed else FP32
        parts["policy weights"] = counts.weights * half / MB / (n if stage == 3 else 1)
        parts["gradients"] = t * (FP32 + (half if stage < 3 and mixed else 0)) / n / MB
        if mixed:
            parts["master weights (fp32)"] = t * FP32 / n / MB
        if stage == 3:
            parts["gathered layers"] = FP32 * counts.largest / MB
    else:  # FSDP2
        frozen = counts.weight_bytes - counts.trainable_bytes
        trained = t * FP32 if mixed else counts.trainable_bytes
        parts["policy weights"] = (frozen + trained) / n / MB
        parts["gradients"] = trained / n / MB
        layers = shape.config.get_text_config().num_hidden_layers
        parts["gathered layers"] = 2 * counts.weights * (shape.mixed or shape.dtype).itemsize / layers / MB
    parts["optimizer states"] = states / (n if stage else 1)
    if stage == 3 and "reference weights" in parts:
        parts["reference weights"] /= n
    if shape.offload:
        for name in (
            "policy weights",
            "reference weights",
            "optimizer states",
            "master weights (fp32)",
            "gradients",
        ):
            parts.pop(name, None)
