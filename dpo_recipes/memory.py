"""Will it fit? A DPO step's peak accelerator memory, predicted before any weight loads, from the model's
config.json alone.

How: a training step of the real architecture (TRL's fused log-prob head on it, the PEFT adapter,
checkpointing, the reference pass, the run's optimizer and its states) runs on fake tensors, which have
shapes and dtypes but no data or memory (PyTorch's FakeTensorMode), under PyTorch's MemTracker, at the
run's micro-batch and sequence length. Decoder layers repeat, so traces of two and of three layers give the whole model's peak
(a 7B model takes seconds). What a CPU trace cannot show is added by formula: 4-bit weights, each
engine's masters and sharding (DeepSpeed's as its own estimator counts them), a judge's weights and
generation cache under judge.every, the CUDA allocator's cache and context. Every run also measures its real peak (the same tracker
on CPU, torch.cuda's counter on GPU) and records it beside the prediction in summary.json.
"""

import builtins
import copy
import dataclasses
import json
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import TrainerCallback

from dpo_recipes import ROOT, hub

MB = 2**20
# The error measured on CPU is within 10% (tests/test_memory.py): within it of the budget, a warning.
MARGIN = 0.10
# CUDA only: the caching allocator's reserve over its allocated peak, and the context and cuBLAS
# workspaces that no tensor accounts for.
ALLOCATOR_SHARE = 0.08
CUDA_CONTEXT_MB = 1024
NF4_BYTES = 0.5 + 0.016  # a 4-bit weight and its double-quantized block scales, bytes per weight
# TRL's fused head scores these per-token outputs for DPO (dpo_trainer.py); WPO adds log_sum_sq_probs.
HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
KINDS = {  # MemTracker's kinds, as the breakdown names them
    "Parameter": "weights",
    "Buffer": "weights",
    "Gradient": "gradients",
    "Optstate": "optimizer states",
    "Activation": "activations",
    "Temp": "temporaries (log-prob head, backward)",
    "Other": "activations",
}


class _NoHook:
    def remove(self):
        pass


class Tracker(MemTracker):
    """MemTracker's totals by kind of memory, without its per-module statistics (they refuse a module run
    twice in one step, as the policy's modules are for an adapter's reference pass)."""

    def _pre_fw_hook(self, module, inputs):
        pass

    def _post_fw_hook(self, module, inputs, outputs):
        pass

    def _pre_bw_hook(self, module, args):
        pass

    def _post_bw_hook(self, module, args):
        pass

    def watch(self, *modules, optimizer=None) -> "Tracker":
        """Track the weights, gradients and optimizer states made before the tracker was entered."""
        for module in filter(None, modules):
            for param in module.parameters():
                if not param.requires_grad:  # MemTracker hooks each weight's gradient; a frozen one has none
                    self._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
            self._track_module_params_and_buffers(module, install_grad_hooks=True)
        if optimizer is not None:
            self.track_external(optimizer)
        return self

    def restart_peak(self) -> dict[str, int]:
        """The peak so far; the next peak is counted from now."""
        found = self.peak()
        self._peak_mem_snap = self.get_tracker_snapshot("current")
        self._peak_mem = {dev: snap["Total"] for dev, snap in self._peak_mem_snap.items()}
        return found

    def peak(self) -> dict[str, int]:
        """Bytes by kind at the peak, summed over devices, with "Total"."""
        found: dict[str, int] = {}
        for snapshot in self.get_tracker_snapshot("peak").values():
            for kind, size in snapshot.items():
                name = getattr(kind, "value", kind)
                found[name] = found.get(name, 0) + size
        return found


@dataclass(frozen=True)
class Shape:
    """What a step's memory depends on, read from a built run; no weights."""

    config: object  # the model's transformers config (config.json)
    reference_config: object | None  # a reference=path model's, where it is another model
    dtype: torch.dtype  # of the loaded weights
    lora: object | None  # peft.LoraConfig
    four_bit: bool
    checkpointing: bool
    reference: str  # the resolved strategy
    batch: int  # pairs per micro-batch
    length: int  # tokens per sequence (prompt and answer)
    args: object  # the DPOConfig: its optimizer
    mixed: torch.dtype | None  # autocast's dtype (bf16, fp16), if any
    cuda: bool
    engine: str = "single"  # hardware.engine
    # Eager attention holds each row's whole score matrix, and a packed layout's rows are longer than a
    # pair's sequences (padding_free: one row a micro-batch; share_prompt alone: one a pair): traced so,
    # at the padded batch's token count (an upper bound: sharing the prompt saves some)
    layout: str = "padded"  # padded, one_row, per_pair
    eager: bool = False
    judge_bytes: int = 0  # judge.every: the judge's weights, kept on the device from the first judging
    generation_tokens: int = 0  # judge.every: the KV cache of a generation batch, in tokens
    zero_stage: int | None = None
    processes: int = 1
    offload: bool = False


def _layers(config, n: int):
    """`config` with its first n decoder layers."""
    config = copy.deepcopy(config)
    text = config.get_text_config()
    text.num_hidden_layers = n
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:n]
    return config


@contextmanager
def _head(cuda: bool):
    """TRL's fused head as the target device runs it: on CUDA its default tiles, the Triton fold and an
    fp32-output matmul into the gradient, which allocate nothing (so they are skipped here); on CPU the
    CPU head's tiles (trainer.cpu_head). Every position is scored: a fake tensor cannot count the
    labelled ones."""
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as trl_utils

    from dpo_recipes.trainer import CPU_TILE

    never, nothing = (lambda device: False), (lambda *args, **kwargs: None)
    patches = [(trl_utils, "_use_triton", never), (chunked, "_use_triton", never)]
    if cuda:
        patches += [(chunked, name, nothing) for name in ("_forward_tile", "_backward_tile", "_addmm_fp32")]
    else:
        patches += [(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", CPU_TILE["VOCAB"])]
        patches += [(chunked, "TOKEN_CHUNK_SIZE", CPU_TILE["TOKENS"])]
    # Every tile's temporaries are alike and freed before the next: the first tile of each loop shows the
    # peak, and a 152k vocabulary's thousands of tiles trace in a moment.
    patches.append((chunked, "range", lambda *bounds: builtins.range(*bounds)[:1]))
    with ExitStack() as stack:
        for owner, name, value in patches:
            stack.enter_context(mock.patch.object(owner, name, value, create=True))
        yield


def _fake_models(shape: Shape, layers: int):
    """Policy and reference (None where the policy's own weights serve) on fake tensors."""
    from peft import get_peft_model
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    config = _layers(shape.config, layers)
    with torch.device("meta"):  # PEFT moves fake tensors in ways they refuse; built on meta, then faked
        attention = {"attn_implementation": "eager"} if shape.eager else {}
        model = AutoModelForCausalLM.from_config(config, dtype=shape.dtype, **attention)
        add_fused_lm_head(model, outputs=HEAD_OUTPUTS)
        reference = None
        if shape.reference in ("copy", "path"):
            own = _layers(shape.reference_config, layers) if shape.reference_config else config
            reference = AutoModelForCausalLM.from_config(own, dtype=shape.dtype, **attention)
            reference.requires_grad_(False)
            add_fused_lm_head(reference)
        if shape.lora is not None:
            lora = copy.deepcopy(shape.lora)  # PEFT writes the modules it found into the config it is given
            model = get_peft_model(model, lora)
            if shape.reference == "sft_adapter":
                model.add_adapter("ref", copy.deepcopy(shape.lora))  # TRL's frozen copy of the adapter
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model.to_empty(device="cpu")
        if reference is not None:
            reference.to_empty(device="cpu")
    return fake, model, reference


def trace(shape: Shape, layers: int) -> tuple[dict[str, int], dict[str, int]]:
    """Peak bytes by kind over a DPO step (not the first: with optimizer states) of the model cut to
    `layers` decoder layers: until the backward reaches the first decoder layer (every layer's
    activations held), and from there through the optimizer step (every layer's gradients held). Each
    grows linearly with the layers, at its own rate."""
    from transformers import Trainer

    fake, model, reference = _fake_models(shape, layers)
    with fake:
        model.train()
        if shape.checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            if shape.lora is not None:
                model.enable_input_require_grads()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(shape.args, model)
        optimizer = optimizer_cls(trainable, **kwargs)
        for param in trainable:  # the optimizer states of a first step: the step traced has them
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracker = Tracker().watch(model, reference, optimizer=optimizer)
        early = {}

        def reached(grad):  # the backward reaches the first decoder layer's output
            if not early:
                early.update(tracker.restart_peak())

        def mark(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.requires_grad:
                hidden.register_hook(reached)

        _decoder_layers(model, layers)[0].register_forward_hook(mark)
        b, n = shape.batch, shape.length
        rows = {"one_row": (1, 2 * b * n), "per_pair": (b, 2 * n)}.get(shape.layout) if shape.eager else None
        ids = torch.zeros(*(rows or (2 * b, n)), dtype=torch.long)
        mask = torch.ones_like(ids)
        with ExitStack() as stack:
            stack.enter_context(tracker)
            stack.enter_context(_head(shape.cuda))
            if shape.mixed is not None:
                stack.enter_context(torch.autocast("cpu", dtype=shape.mixed))
            _step(model, reference, shape, ids, mask)
            optimizer.step()
    return early or {"Total": 0}, tracker.peak()


def _decoder_layers(model, n: int) -> torch.nn.ModuleList:
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)


def _step(model, reference, shape: Shape, ids, mask) -> None:
    """The policy pass, the reference pass without gradients (TRL's order), the sigmoid loss, backward."""
    logps = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True).log_probs.sum(1)
    if shape.reference != "precomputed":
        with torch.no_grad():
            if reference is not None:
                ref = reference(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True)
            else:
                with model.disable_adapter():
                    ref = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True)
        logps = logps - ref.log_probs.sum(1)
    chosen, rejected = logps.chunk(2) if len(logps) % 2 == 0 else (logps, -logps)  # one packed row
    torch.nn.functional.logsigmoid(chosen - rejected).mean().neg().backward()


def _quantized_linears(shape: Shape) -> tuple[int, int]:
    """Weights of the decoder's linear layers (those 4-bit loading quantizes) and the largest one's."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config, dtype=shape.dtype)
    sizes = [
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()
    ]
    return sum(sizes), max(sizes, default=0)


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


_PREDICTED: dict = {}  # shape's fields -> (shape, estimate): a plan asks for the same shape several times


def predict(shape: Shape) -> Estimate:
    key = tuple(v if isinstance(v, int | str | torch.dtype | None) else id(v) for v in vars(shape).values())
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


FP32 = 4


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


# Configs of the shipped recipes' hub models, for planning on a machine that has not downloaded them
# (assets/model_configs/README.md gives their source).
SHIPPED_CONFIGS = ROOT / "assets" / "model_configs"


def model_config(name: str, revision: str | None = None, key: str = "model.model_name_or_path"):
    """The model's config.json: a local folder, the hub cache or the hub, else the copy the project ships."""
    from transformers import AutoConfig

    shipped = SHIPPED_CONFIGS / name.replace("/", "--") / "config.json"
    try:
        return AutoConfig.from_pretrained(name, revision=revision, local_files_only=True)
    except OSError:
        if shipped.is_file():
            return AutoConfig.from_pretrained(shipped.parent)
    with hub.fetching("model", name, key):
        return AutoConfig.from_pretrained(name, revision=revision)


def prep_report(dataset) -> dict | None:
    """The report `make prep` wrote beside a local data file, if any."""
    try:
        return json.loads(Path(f"{dataset.path}.report.json").read_text()) if dataset.path else None
    except (OSError, ValueError):
        return None


def counted_elsewise(report: dict, tokenizer: str, template: str | None) -> str | None:
    """Why a prep report's token counts do not hold for a run with `tokenizer` (and `model.chat_template`
    `template`, if set), or None where they do."""
    from data_prep.pipeline import tokenizer_id

    counted = report.get("counted_with") or {}
    if not counted.get("tokenizer"):
        return "it does not say which tokenizer counted them"
    if counted["tokenizer"] != tokenizer_id(tokenizer):
        return f"they were counted with {counted['tokenizer']}, the run tokenizes with {tokenizer}"
    if template:
        return f"they were counted with the tokenizer's own chat template, the run applies {template}"
    return None


def data_length(dataset, max_length: int | None, tokenizer: str, template: str | None = None) -> int | None:
    """The longest sequence the data can make, from the token counts `make prep` wrote beside a local file
    (its report) with the run's tokenizer and template, capped at max_length; else max_length."""
    report = prep_report(dataset)
    try:
        lengths = report["token_lengths"]
        longest = lengths["prompt"]["max"] + max(lengths["chosen"]["max"], lengths["rejected"]["max"])
    except (KeyError, TypeError):
        return max_length
    if counted_elsewise(report, tokenizer, template):
        return max_length
    return min(longest, max_length) if max_length else longest


def _judging(built, length: int) -> dict:
    """judge.every's terms: the judge's weights as saved, and a generation batch's cache (the prompts of a
    batch at the planned length, plus the new tokens)."""
    judge = built.judge
    if not judge.every or judge.kind == "none":
        return {}
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = model_config(judge.path, judge.revision, "judge.path")
    except hub.Unreachable:  # preflight says it is not counted
        return {}
    dtype = getattr(config, "dtype", None) or torch.float32  # judge.load keeps the saved dtype
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kind = AutoModelForSequenceClassification if judge.kind == "reward" else AutoModelForCausalLM
    with torch.device("meta"):
        model = kind.from_config(config, dtype=dtype)
    batch = min(judge.prompts, 16)  # evaluate.Judging's batch
    return {
        "judge_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "generation_tokens": batch * (length + judge.max_new_tokens),
    }


def accelerate_setting(built, key: str):
    """A setting of the accelerate config the run's hardware option launches with (fsdp_config's too)."""
    import yaml

    path = built.hardware.accelerate_config
    if built.hardware.engine == "single" or not path or not Path(path).is_file():
        return None
    launch = yaml.safe_load(Path(path).read_text()) or {}
    return launch.get(key, (launch.get("fsdp_config") or {}).get(key))


def shape_of(built, *, processes: int | None = None, **changes) -> Shape:
    """The Shape of a built DPO run (`changes`: fields to plan with instead, e.g. batch)."""
    config = model_config(built.model.model_name_or_path, built.model.model_revision)
    dtype = (built.args.model_init_kwargs or {}).get("dtype", built.model.dtype)  # precision.upcast's
    dtype = getattr(torch, dtype) if dtype not in (None, "auto") else getattr(config, "dtype", None)
    args, reference, lora = built.args, built.reference, built.peft
    model = built.model
    length = (
        data_length(built.dataset, args.max_length, model.model_name_or_path, model.chat_template) or 1024
    )
    if reference.strategy == "sft_adapter":  # the policy is the SFT adapter, as saved
        from peft import PeftConfig

        lora = PeftConfig.from_pretrained(reference.path)
    return dataclasses.replace(
        Shape(
            config=config,
            reference_config=model_config(reference.path, reference.revision, "reference.path")
            if reference.strategy == "path"
            else None,
            dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
            lora=lora,
            four_bit=bool(built.model.load_in_4bit),
            checkpointing=bool(args.activation_checkpointing)
            or accelerate_setting(built, "fsdp_activation_checkpointing"),
            reference=built.reference.strategy,
            batch=args.per_device_train_batch_size,
            length=length,
            args=args,
            mixed=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None,
            cuda=built.hardware.device == "cuda",
            engine=built.hardware.engine,
            zero_stage=built.hardware.zero_stage,
            processes=processes or int(accelerate_setting(built, "num_processes") or 1),
            offload="offload" in str(built.hardware.accelerate_config or ""),
            layout="one_row"
            if getattr(args, "padding_free", False)
            else "per_pair"
            if getattr(args, "share_prompt", False)
            else "padded",
            eager=built.model.attn_implementation == "eager",
            **_judging(built, length),
        ),
        **changes,
    )


class Measured(TrainerCallback):
    """The run's real peak beside the prediction, in `record` (summary.json's "memory"): on CUDA
    torch.cuda's counter over the run; on CPU the Tracker over the run's first two optimizer steps (the
    second with the optimizer states), which is where a step's peak is; a resumed run is not measured. Sharded engines keep
    their weights in forms the tracker does not follow: not measured on CPU."""

    STEPS = 2

    def __init__(self, trainer, record: dict, engine: str):
        self.trainer, self.record, self.tracker, self.until = trainer, record, None, None
        self.engine = engine

    def on_step_begin(self, args, state, control, **kwargs):
        fresh = state.global_step == 0  # a resumed run's steps are not its first
        if self.until is None and fresh and args.device.type == "cpu" and self.engine in ("single", "ddp"):
            trainer, self.until = self.trainer, state.global_step + self.STEPS
            self.tracker = Tracker().watch(trainer.model, trainer.ref_model, optimizer=trainer.optimizer)
            self.tracker.__enter__()

    def close(self):
        """Stop tracking (also when training ended early or failed), recording what was measured."""
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.__exit__(None, None, None)
            self.record["measured_peak_mb"] = round(tracker.peak().get("Total", 0) / MB, 1)
            self.record["measured_by"] = f"MemTracker, steps 1-{self.STEPS}"

    def on_step_end(self, args, state, control, **kwargs):
        if self.until is not None and state.global_step >= self.until:
            self.close()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        if args.device.type == "cuda":
            self.record["measured_peak_mb"] = round(torch.cuda.max_memory_allocated(args.device) / MB, 1)
            self.record["measured_by"] = "torch.cuda.max_memory_allocated"


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


def fixes(shape: Shape, budget: float, effective: int) -> list[tuple[str, Estimate]]:
    """Changes that would make a run fit, each with its estimate: those that keep the results first (a
    smaller micro-batch, precomputed reference log-probs, checkpointing), then sharding over GPUs, 4-bit
    weights, shorter sequences."""
    found = []
    if shape.batch > 1 and (best := largest_batch(shape, budget, effective)) and best[0] < shape.batch:
        b = best[0]
        found.append(
            (
                f"train.per_device_train_batch_size={b} train.gradient_accumulation_steps={effective // b}",
                best[1],
            )
        )
    candidates = []  # (kind, text, change): the first shard that fits and the longest length only
    if shape.reference != "precomputed":
        candidates.append(("reference", "reference=precomputed", dict(reference="precomputed")))
    if not shape.checkpointing:
        candidates.append(("checkpointing", "train.activation_checkpointing=true", dict(checkpointing=True)))
    # DeepSpeed stores the weights in the compute dtype (its masters are fp32), whatever they loaded as
    stored = shape.mixed if shape.mixed is not None else shape.dtype
    for n in (2, 4, 8):
        shard = dict(engine="deepspeed", zero_stage=3, processes=n, dtype=stored, offload=False)
        candidates.append(("shard", f"hardware=zero3 NPROC={n}", shard))
    if not shape.four_bit and shape.cuda:
        quantized = dict(four_bit=True, lora=shape.lora or _default_lora(), reference="adapter")
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
            found.append((text, estimate))
            if kind in ("shard", "length"):
                done.add(kind)  # the fewest GPUs, the longest sequences
    return found


def _default_lora():
    from peft import LoraConfig

    return LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")


class TooBig(ValueError):
    """A run predicted not to fit its memory, with the fixes that would."""


def preflight(built, processes: int | None = None, **changes) -> tuple[dict | None, list[str]]:
    """Before any weight loads: the predicted peak of a DPO run, `hardware.micro_batch=auto` applied (the
    run's batch fields set), and the verdict against its budget (budget_mb). Returns summary.json's record
    and the lines to print; raises TooBig, listing the fixes, for a run predicted not to fit. `changes`:
    Shape fields to plan with instead of the run's."""
    if built.task != "dpo":
        return None, []
    args, budget = built.args, budget_mb(built.hardware)
    try:
        shape = shape_of(built, processes=processes, **changes)
        predict(shape)
    except hub.Unreachable:
        raise
    except Exception as err:  # an architecture the trace cannot run: the run goes on unpredicted
        return None, [f"note: peak memory not predicted ({type(err).__name__}: {str(err)[:200]})"]
    effective = shape.batch * args.gradient_accumulation_steps
    lines = []
    if built.hardware.micro_batch == "auto":
        best = largest_batch(shape, budget, effective) if budget else None
        if best:
            args.per_device_train_batch_size, args.gradient_accumulation_steps = best[0], effective // best[0]
            shape = dataclasses.replace(shape, batch=best[0])
        lines.append(
            f"hardware.micro_batch=auto: micro-batch {shape.batch} x accumulation "
            f"{args.gradient_accumulation_steps}"
            + ("" if budget else " as set (no budget: see hardware.memory_gb)")
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
    lines += [
        f"predicted peak memory {where}: {estimate.peak_mb / 1024:.2f} GiB (micro-batch {shape.batch}, "
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
        return record, [*lines, "no memory budget on this machine: add hardware.memory_gb=N for a verdict"]
    gib = f"{budget / 1024:.0f} GiB"
    if estimate.peak_mb > budget * (1 + MARGIN):
        found = fixes(shape, budget, effective)
        raise TooBig(
            "\n".join(
                [
                    f"the run does not fit in {gib}: predicted {estimate.peak_mb / 1024:.1f} GiB; it would fit with"
                    + (":" if found else " none of the usual fixes: use a smaller model or a larger card"),
                    *(f"  {text}  ({e.peak_mb / 1024:.1f} GiB)" for text, e in found),
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
    return record, lines


CARDS_GB = (24, 48, 80, 141)
README_TABLE = ("<!-- memory table: python -m dpo_recipes.memory -->", "<!-- end of memory table -->")


def table(recipes: list[str], cards=CARDS_GB) -> str:
    """The README's table: each recipe's predicted peak per GPU as shipped (its engine over the GPUs its
    accelerate config names), and on each card the largest micro-batch that fits at the same effective
    batch, with its peak."""
    from dpo_recipes import config

    rows = [
        f"| recipe | engine | as shipped | {' | '.join(f'{gb} GB' for gb in cards)} |",
        f"| --- | --- | --- | {' | '.join('---' for _ in cards)} |",
    ]
    for recipe in recipes:
        cfg, _ = config.compose([f"recipes={recipe}"])
        built = config.build(cfg, "unused", machine=False)
        shape = shape_of(built)
        accumulation = built.args.gradient_accumulation_steps
        shipped = predict(shape)
        cells = []
        for gb in cards:
            best = largest_batch(shape, gb * 1024, shape.batch * accumulation)
            cells.append(f"{best[0]} ({best[1].peak_mb / 1024:.1f} GiB)" if best else "does not fit")
        rows.append(
            f"| `{recipe}` | {shape.processes} x {shape.engine} | {shape.batch} x {accumulation}, "
            f"{shipped.peak_mb / 1024:.1f} GiB | {' | '.join(cells)} |"
        )
    return "\n".join(rows)


def shipped_gpu_recipes() -> list[str]:
    recipes = sorted(p.stem for p in (ROOT / "recipes").glob("qwen*.yaml"))
    return [r for r in recipes if "reward" not in r]  # predicted for DPO steps only


if __name__ == "__main__":
    print(README_TABLE[0])
    print(table(shipped_gpu_recipes()))
    print(README_TABLE[1])
