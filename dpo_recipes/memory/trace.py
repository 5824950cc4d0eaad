"""A DPO step traced on fake tensors: the real architecture (TRL's fused log-prob head on it, the PEFT
adapter, checkpointing, the reference pass, the run's optimizer and its states) runs under PyTorch's
FakeTensorMode, which has shapes and dtypes but no data or memory, and MemTracker records the peak by
kind. Decoder layers repeat, so traces of two and of three layers give the whole model's peak."""

import builtins
import copy
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from dpo_recipes.memory.shapes import Shape
from dpo_recipes.training.cpu_head import CPU_TILE

MB = 2**20
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
        for net in filter(None, (model, reference)):
            net.to_empty(device="cpu")  # a new tensor for each use of a weight: tied ones tied again
            (net.get_base_model() if shape.lora is not None and net is model else net).tie_weights()
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
    if shape.head == "logits":
        return _logits_step(model, shape, ids, mask)
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


def _logits_step(model, shape: Shape, ids, mask) -> None:
    """ORPO's and CPO's step as their trainers take it (concatenated_forward): the whole vocabulary's
    logits, the chosen half's NLL over them (ORPO; CPO with cpo_alpha > 0), each sequence's mean log-prob
    (TRL's get_batch_logps), no reference; backward."""
    from trl.experimental.orpo import ORPOTrainer

    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if shape.mixed is not None:  # accelerate's autocast wrapper hands the outputs back in fp32
        logits = logits.float()
    half = len(ids) // 2
    loss = 0
    if shape.chosen_nll:
        chosen = logits[:half, :-1].contiguous()
        loss = torch.nn.functional.cross_entropy(
            chosen.view(-1, chosen.shape[-1]), ids[:half, 1:].reshape(-1)
        )
    logps = ORPOTrainer.get_batch_logps(logits, ids, average_log_prob=True)
    (loss - torch.nn.functional.logsigmoid(logps[:half] - logps[half:]).mean()).backward()


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
