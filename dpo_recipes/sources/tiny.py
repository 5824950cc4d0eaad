"""Tiny models, built offline and deterministically, that load through `from_pretrained` like hub models.

- The tiny Llama: a byte-level BPE tokenizer trained on the bundled toy data with a minimal chat
  template, and a small Llama pre-trained for a few seconds on the toy training conversations, each
  prompt once with its cheerful and once with its gloomy answer. So it writes remarks in either mood
  whatever the prompt asks, and DPO has a preference to teach it (`make samples` shows the change).
  The toy recipes and most tests train it.
- The tiny judge: the tiny Llama with a score head, trained as a reward model by TRL's RewardTrainer
  on the toy training pairs only (never an eval prompt), so it prefers an answer in the asked-for
  mood. `make eval` on the tiny recipes judges with it.
- The tiny Qwen: Qwen2.5's real tokenizer and chat template (assets/qwen2_5_tokenizer) on a
  Qwen2ForCausalLM with Qwen2.5-7B's layout (real 152,064-row vocabulary, q/k/v with bias, grouped
  query attention, untied embeddings, bf16) shrunk to two narrow layers. `+smoke=tiny_qwen` runs the
  Qwen recipes on it.
- Tiny models of the Llama 3.1, Mistral, Gemma 2 and Qwen3 architectures: families.py.

Each is saved once to a cache folder whose name carries its version, so old builds are never reused.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from data_prep.io import atomic_path
from dpo_recipes import ROOT, console
from dpo_recipes.sources import assets

# Bump when anything below changes: the cache folder name carries it, so old builds are never reused.
VERSION = 3
QWEN_VERSION = 1
JUDGE_VERSION = 2
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
CHAT_TEMPLATE = (ROOT / "assets" / "chat_templates" / "tiny.jinja").read_text()
CORPUS = ROOT / "data" / "toy"
# Language-model pre-training of the tiny Llama on the toy training conversations: steps of BATCH
# sequences at a peak learning rate of LR (warm-up, then linear decay). Loss levels off near 0.3 nats
# per token (what is left is the choice of answer) by step 100.
PRETRAIN = dict(steps=150, batch=32, lr=3e-3, warmup=20)
# Qwen2.5-7B's config.json with the widths and depth cut down; the rest as published.
QWEN = dict(
    vocab_size=152064,
    hidden_size=64,
    intermediate_size=320,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    use_sliding_window=False,
    bos_token_id=151643,
    eos_token_id=151645,  # <|im_end|>, as in the Instruct model whose tokenizer and template these are
)
QWEN_TOKENIZER = "assets/qwen2_5_tokenizer"


def path() -> Path:
    """Where the tiny Llama lives; built on first use."""
    return _cached(f"tiny-llama-v{VERSION}", build)


def qwen_path() -> Path:
    """Where the tiny Qwen lives; built on first use."""
    return _cached(f"tiny-qwen2-v{QWEN_VERSION}", build_qwen)


# What a launch (torchrun, accelerate) tells its processes: a trainer started with these joins the launch
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_", "GROUP_", "ROLE_")
LAUNCH_VARIABLES += ("TORCHELASTIC", "ACCELERATE_")


def judge_path(build: bool = True) -> Path:
    """Where the tiny judge lives; built on first use unless `build` is false. Inside a launch of several
    processes it is trained in a process of its own, apart from the launch (its trainer would otherwise
    wait for the launch's other processes)."""
    name = f"tiny-judge-v{JUDGE_VERSION}-llama-v{VERSION}"
    target = assets.cache_dir() / name
    if build and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (target / "config.json").exists():
        alone = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARIABLES)}
        code = "from dpo_recipes.sources import tiny; tiny.judge_path()"
        subprocess.run([sys.executable, "-c", code], env=alone, check=True)
    return _cached(name, build_judge) if build else target


def _cached(name: str, builder) -> Path:
    """Build once: processes that need the same model at once (a sweep's jobs, test workers) wait for
    the first builder instead of repeating its work."""
    from filelock import FileLock

    target = assets.cache_dir() / name
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(target.parent / f"{name}.lock"):
            if not (target / "config.json").exists():
                builder(target)
    return target


def _corpus():
    for file in sorted(CORPUS.glob("*.jsonl")):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            for message in row["prompt"] + row["chosen"] + row["rejected"]:
                yield message["content"]


def bpe(specials: list[str]):
    """A byte-level BPE of VOCAB_SIZE tokens trained on the toy conversations, `specials` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
        ),
    )
    return raw


def build(target: Path, seed: int = SEED) -> None:
    """Train the tokenizer, initialise the model, save both; atomic so parallel builders cannot clash."""
    print(
        f"building the tiny Llama: a tokenizer and a model pre-trained on the toy data, once, into {target.parent}"
    )
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe(SPECIALS),
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
    pretrain(model, tokenizer, seed)
    _save(target, model, tokenizer.save_pretrained)


def pretrain(model, tokenizer, seed: int = SEED) -> None:
    """Causal-LM training on every toy training prompt followed by its chosen and, separately, its
    rejected answer: both moods equally often, so the model learns the remarks but not which one a
    prompt asks for."""
    import torch
    from tqdm import tqdm

    rows = [json.loads(line) for line in (CORPUS / "train.jsonl").read_text().splitlines()]
    texts = [
        tokenizer.apply_chat_template(r["prompt"] + r[side])["input_ids"]
        for r in rows
        for side in ("chosen", "rejected")
    ]
    steps, batch, lr, warmup = (PRETRAIN[k] for k in ("steps", "batch", "lr", "warmup"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (1 - step / steps)
    )
    draw = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="pre-training the tiny model", leave=False):
        picked = [texts[i] for i in torch.randint(len(texts), (batch,), generator=draw)]
        padded = tokenizer.pad({"input_ids": picked}, return_tensors="pt")
        labels = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
        model(**padded, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()


# Reward-model training of the tiny judge: one pass over the toy training pairs.
JUDGE = dict(epochs=3, batch=16, lr=3e-4)  # at lr 1e-3 current libraries train it to chance


def build_judge(target: Path, seed: int = SEED) -> None:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    base = path()
    print(f"building the tiny judge: a reward model trained on the toy pairs, once, into {target.parent}")
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    with console.loading_quietly():  # the new score head is missing from the base, as expected
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [json.loads(line) for line in (CORPUS / "train.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as scratch:
        args = RewardConfig(
            scratch, use_cpu=True, bf16=False, seed=seed, data_seed=seed, report_to="none",
            save_strategy="no", num_train_epochs=JUDGE["epochs"], per_device_train_batch_size=JUDGE["batch"],
            learning_rate=JUDGE["lr"], logging_steps=10,
        )  # fmt: skip
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )
        console.use(trainer)
        trainer.train()
    _save(target, model.eval(), tokenizer.save_pretrained)


def build_qwen(target: Path, seed: int = SEED, device: str = "cpu", **shape) -> None:
    """A bf16 Qwen2 model with the real Qwen2.5 tokenizer files, copied as they are. `shape` overrides
    the tiny dimensions (`make bench-gpu` builds Qwen2.5-7B's, initialised on the GPU)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(Qwen2Config(**{**QWEN, **shape}), dtype=torch.bfloat16)
    tokenizer = assets.unpacked(QWEN_TOKENIZER)

    def copy_tokenizer(folder: Path) -> None:
        for file in tokenizer.iterdir():
            if file.name != "README.md":
                shutil.copy(file, folder / file.name)

    _save(target, model, copy_tokenizer)


def _save(target: Path, model, save_tokenizer) -> None:
    """Save model and tokenizer; atomic, so that parallel builders cannot clash."""
    with atomic_path(target, existing="keep") as staging:
        model.save_pretrained(staging)
        save_tokenizer(staging)
