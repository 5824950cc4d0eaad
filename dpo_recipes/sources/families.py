"""Tiny models of the families the 8B-class recipes train, built offline on first use like the tiny Qwen:
each family's own model class at two narrow layers, randomly initialised in bf16, with what sets the family
apart switched on at tiny sizes, and its chat template and special tokens.

| family | model class | switched on | tokenizer |
| --- | --- | --- | --- |
| `llama3` | LlamaForCausalLM | Llama 3.1's rope scaling (`rope_type: llama3`), untied embeddings | toy BPE, Llama 3's specials, BOS added, no pad token |
| `mistral` | MistralForCausalLM | a 16-token sliding window in every layer (Mistral 7B v0.1's, shorter than any real row) | toy BPE, `<s>` `</s>` `[INST]` `[/INST]`, BOS added, no pad token |
| `gemma2` | Gemma2ForCausalLM | local (16-token window) and global layers alternating, attention and final-logit soft-capping, tied embeddings | toy BPE, Gemma's specials, BOS added |
| `qwen3` | Qwen3ForCausalLM | q/k RMS norms, Qwen3-8B's 151,936-row vocabulary | Qwen2.5's real tokenizer with Qwen3's four added tokens (`<think>` ...) |

Llama 3's, Mistral's and Gemma's own tokenizers cannot be had offline: those families get a byte-level BPE
trained on the toy conversations (the tiny Llama's) with the family's special tokens and template.
"""

from pathlib import Path

from dpo_recipes.sources import assets, tiny

VERSION = 1
TEMPLATES = tiny.ROOT / "assets" / "chat_templates"
SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
WINDOW = 16
FAMILIES = {
    "llama3": dict(
        model="Llama",
        config=dict(
            head_dim=16,
            rope_theta=500000.0,
            max_position_embeddings=4096,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,  # wavelengths over 16 tokens are scaled
            ),
            tie_word_embeddings=False,
        ),
        specials=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        template="llama3_1",
    ),
    "mistral": dict(
        model="Mistral",
        config=dict(
            head_dim=16, sliding_window=WINDOW, max_position_embeddings=4096, tie_word_embeddings=False
        ),
        specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        tokens=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
        template="mistral",
    ),
    "gemma2": dict(
        model="Gemma2",
        config=dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        ),
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        tokens=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
        template="gemma",
    ),
    "qwen3": dict(
        model="Qwen3",
        config=dict(
            head_dim=16,
            vocab_size=151936,
            rope_theta=1000000.0,
            max_position_embeddings=40960,
            tie_word_embeddings=False,
            bos_token_id=151643,
            eos_token_id=151645,
        ),
        added=["<tool_response>", "</tool_response>", "<think>", "</think>"],  # 151665..151668, as Qwen3's
        template="qwen3",
    ),
}


def path(family: str) -> Path:
    """Where the tiny model of `family` lives; built on first use."""
    if family not in FAMILIES:
        raise ValueError(f"no tiny model of family {family!r}; there are {', '.join(FAMILIES)}")
    return tiny._cached(f"tiny-{family}-v{VERSION}", lambda target: build(family, target))


def tokenizer(family: str):
    """The family's tokenizer with its chat template: Qwen2.5's real one with Qwen3's added tokens, or the
    toy BPE with the family's special tokens, adding BOS before every text as the family's own does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = FAMILIES[family]
    template = (TEMPLATES / f"{spec['template']}.jinja").read_text()
    if "added" in spec:
        loaded = AutoTokenizer.from_pretrained(assets.unpacked(tiny.QWEN_TOKENIZER))
        loaded.add_tokens(spec["added"])
        loaded.chat_template = template
        return loaded
    raw = tiny.bpe(spec["specials"])
    bos = spec["tokens"]["bos_token"]
    raw.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, raw.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=raw, chat_template=template, **spec["tokens"])


def model(family: str, vocab_size: int, seed: int = tiny.SEED, **ids):
    """The family's model class at SHAPE with its features on, randomly initialised from `seed`."""
    import torch
    import transformers

    spec = FAMILIES[family]
    config_class = getattr(transformers, f"{spec['model']}Config")
    model_class = getattr(transformers, f"{spec['model']}ForCausalLM")
    torch.manual_seed(seed)
    config = config_class(**{**SHAPE, "vocab_size": vocab_size, **ids, **spec["config"]})
    return model_class._from_config(config, dtype=torch.bfloat16)


def build(family: str, target: Path) -> None:
    print(f"building the tiny {family}: its model class at two narrow layers, once, into {target.parent}")
    made = tokenizer(family)
    ids = {f"{k}_token_id": getattr(made, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    tiny._save(target, model(family, len(made), **ids), made.save_pretrained)
