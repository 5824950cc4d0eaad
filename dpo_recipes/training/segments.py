"""Packed layouts: padding-free batches (each micro-batch's sequences in one row) and the prompt once per
pair. `packed` wraps TRL's fused forward: it packs the padded batch into segments, runs the model once
with attention by segment (`by_segment`, sdpa in buckets of similar lengths, or flex attention's block
mask), and scatters the per-token outputs back into the padded layout TRL reads. Models whose layers
attend within a sliding window are refused (`refused`), before any weight loads."""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dpo_recipes import errors
from dpo_recipes.sources import hub

# Per-token fields of TRL's FusedCausalLMOutput: (batch, seq_len - 1) in the padded batch.
PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def visible(query: list, key: list) -> torch.Tensor:
    """A shared-prompt layout's attention: a query sees a key of its own sequence at or before its column,
    in its branch or shared. Each side: (sequence, column, branch, shared) of its tokens; padding slots are
    sequence -1, so they see each other (a query that sees no key would be NaN under sdpa)."""
    (s, c, b, _), (s2, c2, b2, h2) = query, key
    return (s == s2) & (c2 <= c) & ((b == b2) | h2)


def share_mask(where: list, attention: str | None):
    """`visible` over a layout's (rows, length) tensors `where`, as `attention` takes a mask: a block mask for
    flex attention (built without the dense mask, compiled as transformers builds its own), a 4D mask for
    eager (additive) and sdpa (boolean)."""
    rows, length = where[0].shape
    if attention == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(row, head, q, k):
            return visible([t[row, q] for t in where], [t[row, k] for t in where])

        device = where[0].device
        return torch.compile(create_block_mask)(mask_mod, rows, None, length, length, device=device)
    mask = visible([t[:, :, None] for t in where], [t[:, None] for t in where])[:, None]
    if attention == "eager":
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def by_segment(module, query, key, value, attention_mask, *, segments=None, **kwargs):
    """sdpa; given `segments` (a packed layout's calls, from `attention_calls`), sdpa on its segments gathered into
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


def length_buckets(size: torch.Tensor) -> list:
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


def attention_calls(seq, branch, skip, n: int, width: int, one_row: bool) -> list:
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
        for some in length_buckets(size) if len(kept) else ():
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
            kwargs["segments"] = attention_calls(seq, branch, skip, n, shape[1], one_row)
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


def refused(built) -> str | None:
    """Why the run's model cannot take the packed layouts it asks for (layouts_refused), read from its
    config.json before any weight loads."""
    if built.task != "dpo" or not (built.args.padding_free or built.args.share_prompt):
        return None
    try:
        model = hub.model_config(built.model.model_name_or_path, built.model.model_revision)
    except errors.Unreachable:
        raise
    except (OSError, ValueError):  # a local folder without a model's config: loading it says what is wrong
        return None
    return layouts_refused(built.args, model)
