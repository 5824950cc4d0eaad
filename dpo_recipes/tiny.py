"""A tiny Llama-architecture model and tokenizer, built offline and deterministically.

CPU smoke runs and tests need a real causal LM that loads through `from_pretrained` like any hub model.
The builder trains a byte-level BPE tokenizer on the bundled toy data, wraps it with a chat template,
initialises a small Llama with a fixed seed and saves both once to a cache folder.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from dpo_recipes import ROOT

# Bump when anything below changes: the cache folder name carries it, so old builds are never reused.
VERSION = 2
SEED = 0
VOCAB_SIZE = 1024
MODEL = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = ROOT / "data" / "toy"


def cache_dir() -> Path:
    return Path(os.environ.get("DPO_RECIPES_CACHE") or Path.home() / ".cache" / "dpo_recipes")


def path() -> Path:
    """Where the tiny model lives; built on first use."""
    target = cache_dir() / f"tiny-llama-v{VERSION}"
    if not (target / "config.json").exists():
        build(target)
    return target


def _corpus():
    for file in sorted(CORPUS.glob("*.jsonl")):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            for message in row["prompt"] + row["chosen"] + row["rejected"]:
                yield message["content"]


def build(target: Path, seed: int = SEED) -> None:
    """Train the tokenizer, initialise the model, save both; atomic so parallel builders cannot clash."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **MODEL,
    )
    model = LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
