"""Attention by segment (`segments.by_segment`, what the Trainer runs sdpa as for packed and shared
layouts) against sdpa under the dense mask of the same layout (`segments.share_mask`), on random queries,
keys and values: no weights load."""

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dpo_recipes.training import segments

# (shared prompt tokens, first branch, second branch) per pair: lengths from 1 to 300, so that buckets
# hold one segment (a view) and several (padded), with and without a shared prompt
PAIRS = [(0, 3, 1), (4, 9, 2), (5, 7, 6), (9, 140, 120), (3, 150, 33), (0, 300, 290), (2, 8, 40), (6, 1, 0)]


def laid_out(one_row: bool, share: bool) -> tuple:
    """`packed`'s layout of PAIRS: (seq, branch, skip) in token order and `share_mask`'s `where`."""
    pairs = PAIRS if share else [(0, first, 0) for _, first, _ in PAIRS]
    seq, branch, cols = [], [], []
    for s, (skip, first, second) in enumerate(pairs):
        seq += [s] * (first + second)
        branch += [0] * first + [1] * second
        cols += [*range(first), *range(skip, skip + second)]
    seq, branch, cols = map(torch.tensor, (seq, branch, cols))
    skip = torch.tensor([p[0] for p in pairs])
    count = torch.bincount(seq)
    width = len(seq) if one_row else int(count.max())
    index = torch.arange(len(seq))
    at = (torch.zeros_like(seq), index) if one_row else (seq, index - (count.cumsum(0) - count)[seq])
    rows = 1 if one_row else len(pairs)

    def laid(values, fill):
        return values.new_full((rows, width), fill).index_put(at, values)

    shared = (branch == 0) & (cols < skip[seq])
    where = [laid(seq, -1), laid(cols, 0), laid(branch, 0), laid(shared, False)]
    return (seq, branch, skip, len(pairs), width, one_row), where, laid(torch.ones_like(seq), 0).bool()


@pytest.mark.parametrize("one_row", [True, False], ids=["packed", "padded pairs"])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "sequences"])
def test_attention_by_segment_is_sdpa_under_the_layouts_mask(one_row, share):
    layout, where, real = laid_out(one_row, share)
    groups = segments.attention_calls(*layout)
    assert any(isinstance(g[0], tuple) for g in groups) and any(torch.is_tensor(g[0]) for g in groups)
    assert any(g[3] is not None for g in groups) == share  # a rejected answer reads its shared prompt
    generator = torch.Generator().manual_seed(0)
    rows, width = real.shape
    q, k, v = (torch.randn(rows, heads, width, 8, generator=generator) for heads in (4, 2, 2))
    module = SimpleNamespace(is_causal=True, num_key_value_groups=2, training=False)
    ours, _ = segments.by_segment(module, q, k, v, None, segments=groups)
    dense, _ = sdpa_attention_forward(module, q, k, v, segments.share_mask(where, "sdpa"))
    assert torch.allclose(ours[real], dense[real], atol=1e-5), (ours[real] - dense[real]).abs().max()
    assert not ours[~real].any()  # padding: zeros


def test_buckets_keep_similar_lengths_together():
    sizes = torch.tensor([5, 300, 10, 90, 1000, 200, 64, 330])
    found = sorted(sorted(sizes[b].tolist()) for b in segments.length_buckets(sizes))
    assert found == [[5, 10], [64, 90], [200], [300, 330], [1000]]
    for bucket in found:
        assert bucket[-1] <= bucket[0] * segments.SPREAD + segments.SLACK


def test_buckets_keep_a_rejected_answers_queries_and_keys_alike():
    # (own tokens, shared prompt tokens): the first two have equal sums, but one call for both would pad
    # the second's 100 queries to 400 and the first's 100-token prompt to 400
    sizes = torch.tensor([[400, 100], [100, 400], [410, 120], [90, 50], [100, 60]])
    found = sorted(sorted(map(tuple, sizes[b].tolist())) for b in segments.length_buckets(sizes))
    assert found == [[(90, 50), (100, 60)], [(100, 400)], [(400, 100), (410, 120)]]
    for bucket in found:
        for lengths in zip(*bucket, strict=True):
            assert max(lengths) <= min(lengths) * segments.SPREAD + segments.SLACK
