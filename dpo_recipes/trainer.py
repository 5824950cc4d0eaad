"""TRL's DPOTrainer with only what it lacks: a faster tokenization path giving the same ids
(tokenize.py), a stable fingerprint on the tokenized data, so that later runs (a sweep's jobs) find
it and any precomputed reference log-probs again, with a note of whether they did, a CPU log-prob
head that scores only the positions that have a label, in tiles that fit the cache, padding-free
batches (`train.padding_free=true`: each micro-batch's sequences packed into one row), each pair's
prompt computed once (`train.share_prompt=true`), and a judge at evaluations (`judge.every`)."""

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
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from trl import DPOTrainer

from dpo_recipes import tokenize

# Private TRL names the overrides below rely on, with the parameters TRL calls them with. They move
# between TRL minor versions (pyproject pins the one the tests ran on); where one is not as expected,
# the overrides step aside for TRL's own path, with one warning, instead of breaking the run.
RELIED_ON = [
    (DPOTrainer, "_prepare_dataset", ["self", "dataset", "processing_class", "args", "dataset_name"]),
    (DPOTrainer, "_precompute_ref_logps", ["self", "dataset", "name", "batch_size"]),
    (DPOTrainer, "_load_optimizer_and_scheduler", ["self", "checkpoint"]),
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


def sees(query: list, key: list) -> torch.Tensor:
    """A shared-prompt layout's attention: a query sees a key of its own sequence at or before its column,
    in its branch or shared. Each side: (sequence, column, branch, shared) of its tokens; padding slots are
    sequence -1, so they see each other (a query that sees no key would be NaN under sdpa)."""
    (s, c, b, _), (s2, c2, b2, h2) = query, key
    return (s == s2) & (c2 <= c) & ((b == b2) | h2)


def share_mask(where: list, attention: str | None):
    """`sees` over a layout's (rows, length) tensors `where`, as `attention` takes a mask: a block mask for
    flex attention (built without the dense mask, compiled as transformers builds its own), a 4D mask for
    eager (additive) and sdpa (boolean)."""
    rows, length = where[0].shape
    if attention == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(row, head, q, k):
            return sees([t[row, q] for t in where], [t[row, k] for t in where])

        device = where[0].device
        return torch.compile(create_block_mask)(mask_mod, rows, None, length, length, device=device)
    mask = sees([t[:, :, None] for t in where], [t[:, None] for t in where])[:, None]
    if attention == "eager":
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def by_segment(module, query, key, value, attention_mask, *, segments=None, **kwargs):
    """sdpa; given `segments` (a packed layout's, from `segments`), sdpa on its segments gathered into
    padded batches of similar length, one call each: the sequences (or prompts with their chosen answers)
    under sdpa's causal path, the rejected answers each against its shared prompt's keys and its own. The
    network's other layers still see the layout without padding, and attention costs about what each
    sequence alone costs, not what an explicit mask over a packed row costs. Slots outside any segment
    (padding) get zeros."""
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, heads, length = query.shape[:3]
    flat = [t.transpose(1, 2).reshape(rows * length, t.size(1), t.size(3)) for t in (query, key, value)]
    out = flat[0].new_zeros(rows * length, heads, value.size(-1))
    for gather, pick, put, context, mask in segments:
        q, k, v = (t[gather].transpose(1, 2) for t in flat)  # (segments, heads, tokens, dim)
        if context is not None:
            k, v = (
                torch.cat([t[context].transpose(1, 2), own], 2)
                for t, own in zip(flat[1:], (k, v), strict=True)
            )
        seen, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)  # (segments, tokens, heads, dim)
        out[put] = seen[pick]
    return out.view(rows, length, heads, -1), None


# Under sdpa a packed or shared layout attends by segment; otherwise this is sdpa, masks and all.
SEGMENTED = "sdpa_by_segment"
AttentionInterface.register(SEGMENTED, by_segment)
AttentionMaskInterface.register(SEGMENTED, sdpa_mask)


# Segments go to sdpa in buckets of similar lengths, each length within SPREAD times its bucket's first's
# plus SLACK tokens, either way: padding within a bucket stays small, and short segments share one call.
SPREAD, SLACK = 1.1, 32


def buckets(size: torch.Tensor) -> list:
    """Indices into `size`, one length per segment or several ((segments, lengths): a rejected answer's own
    tokens and its shared prompt's, the queries and keys its call pads). Shortest first, each segment joins
    the first bucket whose first segment's lengths all band with its own, or starts one."""
    lengths, firsts, out = size.view(len(size), -1).tolist(), [], []
    for i in sorted(range(len(lengths)), key=lambda i: sum(lengths[i])):
        near = [
            n
            for n, first in enumerate(firsts)
            if all(max(a, b) <= min(a, b) * SPREAD + SLACK for a, b in zip(first, lengths[i], strict=True))
        ]
        if not near:
            firsts, out = [*firsts, lengths[i]], [*out, []]
        out[near[0] if near else -1].append(i)
    return [torch.tensor(b, device=size.device) for b in out]


def segments(seq, branch, skip, n: int, width: int, one_row: bool) -> list:
    """`by_segment`'s buckets for a layout laid out by `packed` (rows of `width`), each as (gather, pick,
    put, context, mask): the index taking its segments' tokens from the flat layout, padded to the
    bucket's longest (a slice, a view, for a bucket of one), the index picking the real ones from the
    result and where they go back; for rejected answers (from the prompt's last token on), the index of
    the `skip` prompt tokens each shares, and the mask letting each see those and its own tokens up to
    itself."""
    counts = torch.bincount(seq * 2 + branch, minlength=2 * n).view(n, 2)
    total = counts.sum(1)
    start = total.cumsum(0) - total if one_row else torch.arange(n, device=seq.device) * width

    def gathered(first, length) -> tuple:  # (gather, pick, put)
        if len(first) == 1:
            first, length = int(first), int(length)
            return (None, slice(first, first + length)), 0, slice(first, first + length)
        at = torch.arange(int(length.max()), device=seq.device)
        valid = at < length[:, None]
        index = torch.where(valid, first[:, None] + at, 0)
        return index, valid, index[valid]

    out, chosen = [], counts[:, 0]
    for length, first, shared in ((chosen, start, None), (counts[:, 1], start + chosen, skip)):
        kept = (length > 0).nonzero()[:, 0]
        size = length[kept] if shared is None else torch.stack([length[kept], shared[kept]], 1)
        for some in buckets(size) if len(kept) else ():
            some = kept[some]
            if shared is None or not shared[some].any():
                out.append((*gathered(first[some], length[some]), None, None))  # none: sdpa's causal path
                continue
            longest, seen = int(length[some].max()), torch.arange(int(shared[some].max()), device=seq.device)
            own = torch.ones(longest, longest, dtype=torch.bool, device=seq.device).tril()
            seen = (seen < shared[some, None])[:, None].expand(-1, longest, -1)
            mask = torch.cat([seen, own.expand(len(some), -1, -1)], 2)[:, None]
            out.append((*gathered(first[some], length[some]), gathered(start[some], shared[some])[0], mask))
    return out


def packed(fused_forward, *, share: bool = False, one_row: bool = True):
    """`fused_forward` (TRL's fused LM head) run on a padded batch's real tokens laid out afresh, each token
    scored against the next token of its own row, the per-token outputs put back in the padded batch's
    layout (zero where it has no label), so TRL's losses and metrics read exactly what they read without.

    `one_row`: all sequences packed into one row, positions restarting at each, from which transformers
    keeps attention within a sequence (a varlen kernel under flash attention).
    `share`: each pair (TRL's batch: B chosen rows, then B rejected rows) as one sequence, the prompt they
    share, then the chosen answer, then the rejected one from the prompt's last token on, its positions
    continuing the prompt's and a mask keeping it from the chosen answer (`share_mask`); pairs padded to
    one length, or side by side in one row with `one_row`. A prompt the two rows do not share (truncated
    from the left) shares as many tokens as agree. Positions are the padded columns: TRL pads on the right."""

    def forward(*args, fused_lm_head=False, input_ids=None, attention_mask=None, labels=None, **kwargs):
        other = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        if (
            not fused_lm_head
            or args
            or other
            or attention_mask is None
            or labels is None
            or (share and len(labels) % 2)
        ):
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
            given = {k: v for k, v in given.items() if v is not None}  # positional ids stay positional
            return fused_forward(*args, fused_lm_head=fused_lm_head, **given, **kwargs)
        real = attention_mask.bool()
        after = torch.nn.functional.pad(labels.masked_fill(~real, -100), (0, 1), value=-100)[:, 1:]
        n = len(labels) // 2 if share else len(labels)  # sequences: pairs, or rows
        keep, skip = real, labels.new_zeros(n)  # skip: a rejected row's leading tokens read in the chosen row
        if share:
            prompt = real & (labels == -100)
            same = (input_ids[:n] == input_ids[n:]) & prompt[:n] & prompt[n:]
            skip = (same.long().cumprod(1).sum(1) - 1).clamp(min=0)  # all shared but the last, read once
            keep = real.clone()
            keep[n:] &= torch.arange(real.size(1), device=real.device) >= skip[:, None]
        rows, cols = keep.nonzero(as_tuple=True)
        seq, branch = rows % n, rows // n  # branch: 0 the chosen row (or any row), 1 the rejected row
        order = torch.argsort(seq * 2 + branch, stable=True)  # sequence by sequence, columns in order
        rows, cols, seq, branch = rows[order], cols[order], seq[order], branch[order]
        index = torch.arange(len(rows), device=rows.device)
        count = torch.bincount(seq, minlength=n)
        at = (torch.zeros_like(index), index) if one_row else (seq, index - (count.cumsum(0) - count)[seq])
        shape = (1, len(rows)) if one_row else (n, int(count.max()))

        def laid(values, fill):
            return values.new_full(shape, fill).index_put(at, values)

        shared = (branch == 0) & (cols < skip[seq])
        inputs = {"input_ids": laid(input_ids[rows, cols], 0), "shift_labels": laid(after[rows, cols], -100)}
        inputs["position_ids"] = laid(cols, 0)
        attention = fused_forward.__self__.config._attn_implementation
        if attention == SEGMENTED:
            kwargs["segments"] = segments(seq, branch, skip, n, shape[1], one_row)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])  # sdpa then builds no mask
        elif share:
            where = [laid(seq, -1), laid(cols, 0), laid(branch, 0), laid(shared, False)]
            inputs["attention_mask"] = share_mask(where, attention)
        out = fused_forward(**inputs, fused_lm_head=True, **kwargs)
        src = torch.cat([index, index[shared]])  # a shared token's values, the rejected row's too
        rows, cols = torch.cat([rows, rows[shared] + n]), torch.cat([cols, cols[shared]])
        kept = cols < labels.size(1) - 1  # a row's last column predicts nothing in the padded batch
        for name in PER_TOKEN:
            value = getattr(out, name)
            if value is not None:
                flat = value[at][src[kept]]
                setattr(
                    out, name, value.new_zeros(after[:, :-1].shape).index_put((rows[kept], cols[kept]), flat)
                )
        return out

    return forward


def sliding_layers(config) -> int:
    """How many of a model's layers attend within a sliding window (Mistral's every layer, Gemma 2's every
    other, Qwen2's above max_window_layers with use_sliding_window)."""
    text = config.get_text_config()
    kinds = getattr(text, "layer_types", None)
    if kinds:
        return sum(kind == "sliding_attention" for kind in kinds)
    window = getattr(text, "sliding_window", None)
    return text.num_hidden_layers if window and getattr(text, "use_sliding_window", True) else 0


def layouts_refused(args, config) -> str | None:
    """Why the packed layouts cannot run this model: they attend without its sliding windows (each
    sequence causal over all of its tokens), which would change the log-probs the padded batch gives."""
    asked = [f"train.{flag}" for flag in ("padding_free", "share_prompt") if getattr(args, flag, False)]
    windowed = sliding_layers(config)
    if not asked or not windowed:
        return None
    return (
        f"{' and '.join(asked)}: {windowed} of the model's layers attend within a sliding window, which the "
        f"packed layouts do not apply; set {' '.join(f'{flag}=false' for flag in asked)} (padded batches "
        "keep the window)"
    )


def changed_in_trl() -> list[str]:
    return [
        f"{owner.__name__}.{name}"
        for owner, name, params in RELIED_ON
        if not hasattr(owner, name)
        or (params and list(inspect.signature(getattr(owner, name)).parameters) != params)
    ]


class Trainer(DPOTrainer):
    """See the module's docstring."""

    def __init__(self, *args, judging=None, **kwargs):
        self.tokenize_log, self.trl_changed, self.judging = {}, changed_in_trl(), judging
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
        if packing and getattr(self.model.config, "_attn_implementation", None) == "eager":
            print(
                "note: train.padding_free under eager attention: a packed row's mask covers all of its "
                "tokens, so attention costs more than padding saves (README, padding-free batches); sdpa, "
                "flash_attention_2/3 and flex_attention attend within each sequence",
                file=sys.stderr,
            )
        self.share_prompt = bool(getattr(config, "share_prompt", False)) and not self.trl_changed
        for model in (self.model, self.ref_model) if packing or self.share_prompt else ():
            if model is not None:
                model = getattr(model, "module", model)  # a reference DeepSpeed already wrapped
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                if base.config._attn_implementation == "sdpa":
                    base.config._attn_implementation = SEGMENTED
                base.forward = packed(base.forward, share=self.share_prompt, one_row=packing)

    def train(self, *args, **kwargs):
        if self.judging is not None and self.is_world_process_zero():  # the first process judges
            self.judging.start(self)  # before a resumed run's checkpoint loads: the policy is the reference
        return super().train(*args, **kwargs)

    def log(self, logs: dict, *args, **kwargs):
        """An evaluation's metrics (`logs` is the dict evaluate() returns) gain the judge's at its steps.
        Unless train.metric_for_best_model names another metric, the best judged step is the state's
        best, so the checkpoint saved there survives save_total_limit."""
        step = self.state.global_step
        if self.judging is not None and "eval_loss" in logs and self.judging.due(step):
            # The first process judges; every process takes its numbers, so that all agree on the best
            # step: saving a checkpoint waits on every process, and reads the best step on each
            judged = [self.judging(self) if self.is_world_process_zero() else None]
            if self.args.world_size > 1:
                torch.distributed.broadcast_object_list(judged, src=0)
            logs.update(judged[0])
            won, state = logs["eval_judge/win_rate"], self.state
            if self.args.metric_for_best_model is None and (
                state.best_metric is None or won > state.best_metric
            ):
                state.best_metric, state.best_global_step = won, step
        return super().log(logs, *args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """A resumed run's optimizer and schedule as its checkpoint left them, with the hyperparameters
        this launch gives (an allowed change, run.allow_changes): the checkpoint would bring back its own
        peak learning rate, betas, eps and weight decay. The schedule goes on at the same step from the new
        peak."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.trl_changed:
            return
        _, given = type(self).get_optimizer_cls_and_kwargs(self.args, self.model)
        given = {k: v for k, v in given.items() if k in ("betas", "eps", "weight_decay")}
        for group in self.optimizer.param_groups:
            group.update({k: v for k, v in given.items() if k != "weight_decay" or group.get(k)})
            group["initial_lr"] = self.args.learning_rate
        scheduler = self.lr_scheduler
        if hasattr(scheduler, "base_lrs") and hasattr(scheduler, "lr_lambdas"):  # LambdaLR: HF's schedules
            scheduler.base_lrs = [self.args.learning_rate] * len(scheduler.base_lrs)
            for group, rule in zip(self.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
                group["lr"] = self.args.learning_rate * rule(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

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
