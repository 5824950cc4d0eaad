"""A faster path to the token ids TRL's DPOTrainer trains on, producing exactly the same ids.

TRL 1.16 prepares each row on its own: three chat-template calls, each tokenizing the whole prompt
again through the Python tokenizer API. Here a whole batch of rows is rendered, the prompt is tokenized
once and each completion against it (see `anchors`), every text of the batch goes through the Rust
tokenizer in one parallel call, and the prompt/completion split follows TRL's rule (the completion
starts where the tokenized prompt and prompt+completion diverge).

A row whose rendered prompt (with the generation prompt) is not the start of its rendered prompt+answer
(a template that is not prefix-stable for it) is tokenized whole, prompt and prompt+answer apart, as
TRL does it; the other rows of its batch keep the fast path, and every row keeps its place.
"""

import contextlib
import gc
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging

from data_prep.pipeline import source_hash

logger = logging.get_logger(__name__)
CODE = source_hash(Path(__file__))
# Pre-tokenizers that treat every piece of a text alike; Metaspace only without prepend_scheme "first".
PIECEWISE = {
    "BertPreTokenizer",
    "ByteLevel",
    "CharDelimiterSplit",
    "Digits",
    "Metaspace",
    "Punctuation",
    "Split",
    "UnicodeScripts",
    "Whitespace",
    "WhitespaceSplit",
}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _piecewise(pre_tokenizer: dict | None) -> bool:
    if pre_tokenizer is None:
        return True
    if pre_tokenizer["type"] == "Sequence":
        return all(_piecewise(p) for p in pre_tokenizer["pretokenizers"])
    return pre_tokenizer["type"] in PIECEWISE and pre_tokenizer.get("prepend_scheme") != "first"


def anchors(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Added tokens after which a text can be cut and its two parts tokenized apart, with their ids.

    `tokenizers` cuts a text at its added tokens before anything else and encodes the pieces apart, so
    ids(head + tail) == ids(head) + ids(tail) when head's tokens end with such a token (checked per
    row), the token is matched on the raw text (not normalized), takes nothing from its right (rstrip,
    single_word), is not part of a longer added token, and no pre-tokenizer treats the start of the
    whole text specially. Only the tokens the chat template writes are kept: any subset will do.
    """
    backend = tokenizer.backend_tokenizer
    if not _piecewise(json.loads(backend.to_str())["pre_tokenizer"]):
        return {}
    added = backend.get_added_tokens_decoder()
    contents = [token.content for token in added.values()]
    return {
        token.content: id_
        for id_, token in added.items()
        if token.content in str(tokenizer.chat_template)
        and not (token.normalized or token.rstrip or token.single_word)
        and sum(token.content in other for other in contents) == 1
    }


def _cut(prompt: str, anchors: dict[str, int]) -> tuple[int, int | None]:
    """Where the prompt's last anchor ends, and its id; (0, None) without one."""
    end, anchor = 0, None
    for content, id_ in anchors.items():
        at = prompt.rfind(content)
        if at >= 0 and at + len(content) > end:
            end, anchor = at + len(content), id_
    return end, anchor


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def _column(ids: list[list[int]]) -> pa.ListArray:
    """int64 lists, as `datasets` infers from TRL's lists of ints, without its per-row inference."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), values
    )


def _render(tokenizer, messages: dict) -> tuple[list[str], dict[str, list[str]]]:
    """The rendered prompts (with the generation prompt), and the rendered prompt+chosen and +rejected."""
    render = tokenizer.apply_chat_template
    prompts = render(messages["prompt"], add_generation_prompt=True, tokenize=False)
    full = {
        key: render([p + c for p, c in zip(messages["prompt"], messages[key], strict=True)], tokenize=False)
        for key in ("chosen", "rejected")
    }
    return prompts, full


def _ids(tokenizer, prompts: list[str], full: dict, cuts: list[int]) -> list[list]:
    """Per row: the ids of the prompt's head (up to the cut), its rest, and prompt+chosen and
    prompt+rejected from the cut on. A cut is 0 where a row is tokenized whole."""
    rests = [prompt[end:] for prompt, end in zip(prompts, cuts, strict=True)]
    heads = [prompt[:end] for prompt, end in zip(prompts, cuts, strict=True)]
    chosen = [text[end:] for text, end in zip(full["chosen"], cuts, strict=True)]
    rejected = [text[end:] for text, end in zip(full["rejected"], cuts, strict=True)]
    ids = _encode(tokenizer, heads + rests + chosen + rejected)
    n = len(prompts)
    return [list(row) for row in zip(ids[:n], ids[n : 2 * n], ids[2 * n : 3 * n], ids[3 * n :], strict=True)]


@contextlib.contextmanager
def _gc_paused():
    """A batch makes millions of small acyclic objects; collecting between them only costs time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tokenize_batch(batch: pa.Table, tokenizer: PreTrainedTokenizerFast, anchors: dict, code: str) -> pa.Table:
    """`code` (CODE) only keys the cache."""
    with _gc_paused():
        messages = {k: batch.column(k).to_pylist() for k in ("prompt", "chosen", "rejected")}
        prompts, full = _render(tokenizer, messages)
        stable = [
            c.startswith(p) and r.startswith(p) for p, c, r in zip(prompts, *full.values(), strict=True)
        ]
        cuts = [_cut(p, anchors) if ok else (0, None) for p, ok in zip(prompts, stable, strict=True)]
        ids = _ids(tokenizer, prompts, full, [end for end, _ in cuts])
        # A row whose head's tokens do not end with its anchor's token is tokenized again uncut.
        redo = [
            i
            for i, (row, (_, anchor)) in enumerate(zip(ids, cuts, strict=True))
            if anchor is not None and row[0][-1:] != [anchor]
        ]
        if redo:
            again = {k: [v[i] for i in redo] for k, v in full.items()}
            for i, row in zip(
                redo, _ids(tokenizer, [prompts[i] for i in redo], again, [0] * len(redo)), strict=True
            ):
                ids[i] = row
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
        for head, rest, chosen, rejected in ids:
            split = min(_common_prefix(rest, chosen), _common_prefix(rest, rejected))
            if split < len(rest):
                logger.warning_once(
                    "The tokenized prompt is not a prefix of the tokenized prompt+completion: the completion "
                    "starts where they diverge, as in TRL, and the prompt's end is left out of training."
                )
            out["prompt_ids"].append(head + rest[:split])
            out["chosen_ids"].append(chosen[split:])
            out["rejected_ids"].append(rejected[split:])
        for key, column in out.items():
            batch = batch.append_column(key, _column(column))
        return batch


def eligible(dataset, tokenizer) -> bool:
    """Conversational prompt/chosen/rejected rows not tokenized yet, a fast tokenizer without preset
    truncation or padding, no per-row tools or template options. Tokenized data takes TRL's path, which
    passes it through (`trainer.evaluate(dataset)` prepares what it is handed)."""
    columns = set(dataset.column_names or [])
    return (
        isinstance(dataset, Dataset)
        and "prompt_ids" not in columns
        and isinstance(tokenizer, PreTrainedTokenizerFast)
        and tokenizer.backend_tokenizer.truncation is None
        and tokenizer.backend_tokenizer.padding is None
        and {"prompt", "chosen", "rejected"} <= columns
        and not columns & {"tools", "chat_template_kwargs", "images", "image"}
        and len(dataset) > 0
        and isinstance(dataset[0]["prompt"], list)
    )


def identity(tokenizer: PreTrainedTokenizerFast) -> str:
    """A key for everything the tokenizer's output depends on, for the tokens' cache: its Rust tokenizer
    as JSON (vocabulary, merges, normalizer, added tokens) and its Python state (chat template, special
    tokens, sides). Hashing the object itself also walks the Python copies of the vocabulary and merges
    it was built from, about a second each time for Qwen's 151,646 tokens."""
    if not isinstance(tokenizer, PreTrainedTokenizerFast):  # a slow tokenizer or a processor
        return Hasher.hash(tokenizer)
    built_from = {"_tokenizer", "_vocab", "_merges"}
    state = {k: v for k, v in vars(tokenizer).items() if k not in built_from}
    return Hasher.hash((type(tokenizer).__name__, tokenizer.backend_tokenizer.to_str(), state))


def prepare(
    dataset: Dataset, tokenizer, max_length: int | None, truncation_mode: str, num_proc: int | None, name: str
):
    """TRL's `_prepare_dataset` for eligible datasets: ids, then the same drop of rows whose prompt alone
    fills max_length."""
    forks = bool(num_proc and num_proc > 1)
    if forks:  # workers then share the parent's objects instead of copying each page to collect them
        gc.freeze()
    rows, cut = dataset.with_format("arrow"), anchors(tokenizer)
    try:
        tokenized = rows.map(
            tokenize_batch,
            batched=True,
            batch_size=256,
            fn_kwargs={"tokenizer": tokenizer, "anchors": cut, "code": CODE},
            num_proc=num_proc,
            new_fingerprint=Hasher.hash((rows._fingerprint, identity(tokenizer), cut, CODE)),
            desc=f"Tokenizing {name} dataset",
        )
    finally:
        if forks:
            gc.unfreeze()
    tokenized = tokenized.with_format(dataset.format["type"], **dataset.format["format_kwargs"])
    if max_length is not None and truncation_mode == "keep_start":
        lengths = pc.list_value_length(tokenized.with_format("arrow")["prompt_ids"]).to_numpy()
        keep = np.flatnonzero(lengths < max_length)
        if len(keep) < len(tokenized):
            tokenized = tokenized.select(keep)
    return tokenized


def template_system_prompt(tokenizer) -> str | None:
    """The system message the chat template writes into a conversation that has none (Qwen2.5's "You
    are Qwen, created by Alibaba Cloud. ..."), or None. Rows without a system turn are trained with it."""
    probe, user = "SYSTEM-PROBE-2e9c", [{"role": "user", "content": "Hi"}]
    try:
        bare = tokenizer.apply_chat_template(user, tokenize=False)
        marked = tokenizer.apply_chat_template([{"role": "system", "content": probe}, *user], tokenize=False)
    except Exception:  # no template, or one that refuses a system turn
        return None
    head, _, tail = marked.partition(probe)
    if bare.startswith(head) and bare.endswith(tail) and len(bare) > len(head) + len(tail):
        return bare[len(head) : len(bare) - len(tail)]
    return None
