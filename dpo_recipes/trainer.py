"""TRL's DPOTrainer with only what it lacks: a faster tokenization path giving the same ids
(tokenize.py), a stable fingerprint on the tokenized data, so that later runs (a sweep's jobs) find
it and any precomputed reference log-probs again, with a note of whether they did, a CPU log-prob
head that scores only the positions that have a label, in tiles that fit the cache, and padding-free
batches (`train.padding_free=true`: each micro-batch's sequences packed into one row)."""

import inspect
import os
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import trl
import trl.kernels.chunked_logprob as trl_chunked
import trl.trainer.utils as trl_utils
from datasets.fingerprint import Hasher
from trl import DPOTrainer

from dpo_recipes import tokenize

# Private TRL names the overrides below rely on, with the parameters TRL calls them with. They move
# between TRL minor versions (pyproject pins the one the tests ran on); where one is not as expected,
# the overrides step aside for TRL's own path, with one warning, instead of breaking the run.
RELIED_ON = [
    (DPOTrainer, "_prepare_dataset", ["self", "dataset", "processing_class", "args", "dataset_name"]),
    (DPOTrainer, "_precompute_ref_logps", ["self", "dataset", "name", "batch_size"]),
    (trl_utils, "global_then_local_main_first", None),
    (trl_utils, "_use_triton", ["device"]),
    (trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None),
    (trl_chunked, "TOKEN_CHUNK_SIZE", None),
    (trl_utils, "FusedCausalLMOutput", None),  # its fields: PER_TOKEN, read and written by packed()
]
# TRL's fused LM head scores only labelled positions where `trl_utils._use_triton` says so (CUDA); elsewhere
# it scores every position, prompt and padding too, in 4,096 x 32,768 tiles of ~20 fp32 temporaries each,
# hundreds of MB freshly mapped per tile. On CPU the same arithmetic runs on labelled positions only, in
# tiles of TOKENS x VOCAB that stay in the cache. TRL's torch fold still computes every value.
CPU_TILE = {"TOKENS": 256, "VOCAB": 4096}


@contextmanager
def cpu_head():
    """Within: TRL's fused LM head on a CPU tensor scores only labelled positions, in CPU_TILE tiles."""
    saved = trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_chunked.TOKEN_CHUNK_SIZE
    trl_utils._use_triton = lambda device: device.type == "cpu" or saved[0](device)
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_chunked.TOKEN_CHUNK_SIZE = (
        CPU_TILE["VOCAB"],
        CPU_TILE["TOKENS"],
    )
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_chunked.TOKEN_CHUNK_SIZE = saved


# Per-token fields of TRL's FusedCausalLMOutput: (batch, seq_len - 1) in the padded batch.
PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def packed(fused_forward):
    """`fused_forward` (TRL's fused LM head) run on a padded batch's real tokens packed into one row: the
    positions restart at each sequence, from which transformers keeps attention within it (a varlen
    kernel under flash attention), and each token is scored against the next token of its own sequence.
    The per-token outputs come back in the padded batch's layout, zero where the padded batch has no
    label, so TRL's losses and metrics read exactly what they read without packing. Equal to the padded
    forward of right-padded rows (TRL's collator), where positions also start at 0."""

    def forward(*args, fused_lm_head=False, input_ids=None, attention_mask=None, labels=None, **kwargs):
        other = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        if not fused_lm_head or args or other or attention_mask is None or labels is None:
            return fused_forward(
                *args, fused_lm_head=fused_lm_head, input_ids=input_ids, attention_mask=attention_mask,
                labels=labels, **kwargs,
            )  # fmt: skip
        rows, cols = attention_mask.bool().nonzero(as_tuple=True)  # row by row: one sequence after another
        index = torch.arange(len(rows), device=rows.device)
        starts = torch.ones_like(rows, dtype=torch.bool)
        starts[1:] = rows[1:] != rows[:-1]
        positions = index - torch.cummax(torch.where(starts, index, 0), 0).values
        ends = starts.roll(-1)  # each sequence's last token: nothing of its own to predict
        out = fused_forward(
            input_ids=input_ids[rows, cols][None],
            position_ids=positions[None],
            shift_labels=labels[rows, cols].roll(-1).masked_fill(ends, -100)[None],
            fused_lm_head=True,
            **kwargs,
        )
        keep = cols < labels.size(1) - 1  # a row's last column predicts nothing in the padded batch
        shape = (labels.size(0), labels.size(1) - 1)
        for name in PER_TOKEN:
            value = getattr(out, name)
            if value is not None:
                setattr(out, name, value.new_zeros(shape).index_put((rows[keep], cols[keep]), value[0, keep]))
        return out

    return forward


def changed_in_trl() -> list[str]:
    return [
        f"{owner.__name__}.{name}"
        for owner, name, params in RELIED_ON
        if not hasattr(owner, name)
        or (params and list(inspect.signature(getattr(owner, name)).parameters) != params)
    ]


class Trainer(DPOTrainer):
    """See the module's docstring."""

    def __init__(self, *args, **kwargs):
        self.tokenize_log, self.trl_changed = {}, changed_in_trl()
        if self.trl_changed:
            print(
                f"warning: TRL {trl.__version__} changed {', '.join(sorted(self.trl_changed))}; "
                "its own data preparation, log-prob head and padded batches run instead of the faster "
                "paths (same results, slower)",
                file=sys.stderr,
            )
        config = kwargs.get("args")  # the project passes it by name
        packing = bool(getattr(config, "padding_free", False)) and not self.trl_changed
        if packing:  # TRL turns its own padding_free off for DPO, with a warning; packing here does it
            config.padding_free = False
        super().__init__(*args, **kwargs)
        self.packing = packing
        attention = getattr(self.model.config, "_attn_implementation", None)
        if packing and not str(attention).startswith("flash_attention"):
            print(
                f"note: train.padding_free under {attention} attention: a packed row's mask covers all of "
                "its tokens, so attention costs more than padding saves (README, padding-free batches); "
                "flash_attention_2/3 attend within each sequence",
                file=sys.stderr,
            )
        for model in (self.model, self.ref_model) if packing else ():
            if model is not None:
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                base.forward = packed(base.forward)

    def _head(self):
        """The CPU head while on CPU; TRL's own head elsewhere (on CUDA it already scores only labels)."""
        return cpu_head() if self.args.device.type == "cpu" and not self.trl_changed else nullcontext()

    def training_step(self, *args, **kwargs):  # the forward and the backward
        with self._head():
            return super().training_step(*args, **kwargs)

    def prediction_step(self, *args, **kwargs):
        with self._head():
            return super().prediction_step(*args, **kwargs)

    def _prepare_dataset(self, *args, **kwargs):
        if self.trl_changed:
            return super()._prepare_dataset(*args, **kwargs)
        return self._prepare(*args, **kwargs)

    def _prepare(self, dataset, processing_class, args, dataset_name):
        start, path = time.perf_counter(), "trl"
        if tokenize.eligible(dataset, processing_class):
            # As in TRL: the main process tokenizes first, the others then read its cache.
            with trl_utils.global_then_local_main_first():
                prepared = tokenize.prepare(
                    dataset,
                    processing_class,
                    args.max_length,
                    args.truncation_mode,
                    args.dataset_num_proc,
                    dataset_name,
                )
            path = "fast"
        else:
            prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        # Seconds spent and the tokenized table's file: a later run that reuses the tokens names the same file.
        self.tokenize_log[dataset_name] = {
            "seconds": round(time.perf_counter() - start, 3),
            "path": path,
            "cache_file": prepared.cache_files[0]["filename"] if prepared.cache_files else None,
        }
        # TRL's length filter hashes the whole DPOConfig, output_dir included, so every run would give
        # the same tokens a new fingerprint. Key them on what they depend on instead.
        # ld_alpha and precision shape the reference log-probs cached under this fingerprint too.
        inputs = (dataset._fingerprint, Hasher.hash(processing_class), args.max_length, args.truncation_mode)
        prepared._fingerprint = Hasher.hash(
            (*inputs, args.ld_alpha, args.bf16, args.fp16, trl.__version__, tokenize.CODE)
        )
        return prepared

    def _precompute_ref_logps(self, *args, **kwargs):
        if self.trl_changed:
            return super()._precompute_ref_logps(*args, **kwargs)
        dataset, name = args[0], args[1]
        # TRL caches them next to the tokenized data under this fingerprint (see its _precompute_ref_logps).
        fingerprint = Hasher.hash((dataset._fingerprint, self._precompute_model_hash))
        hit = os.path.exists(dataset._get_cache_file_path(fingerprint))
        self.__dict__.setdefault("ref_logps_cache", {})[name] = "hit" if hit else "computed"
        with self._head():
            return super()._precompute_ref_logps(*args, **kwargs)
