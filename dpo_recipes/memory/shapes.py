"""The shape of a run as the memory prediction needs it (`Shape`), read from the built config and the
model's config.json: engine, processes, dtype, micro-batch, the longest sequence (from the prep
report's token counts when they hold for this tokenizer), reference, adapter, judge."""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.tokens import tokenizer_id
from dpo_recipes import errors
from dpo_recipes.sources import hub

NO_REFERENCE = ("orpo", "cpo")  # tasks whose step has no reference pass


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
    # ORPO and CPO/SimPO (reference "none") score the whole vocabulary's logits, as TRL's trainers do, and
    # ORPO (CPO with cpo_alpha > 0) adds the chosen answers' NLL over them
    head: str = "fused"  # fused, logits
    chosen_nll: bool = False


def prep_report(dataset) -> dict | None:
    """The report `make prep` wrote beside a local data file, if any."""
    try:
        return json.loads(Path(f"{dataset.path}.report.json").read_text()) if dataset.path else None
    except (OSError, ValueError):
        return None


def counted_elsewise(report: dict, tokenizer: str, template: str | None) -> str | None:
    """Why a prep report's token counts do not hold for a run with `tokenizer` (and `model.chat_template`
    `template`, if set), or None where they do."""
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
        config = hub.model_config(judge.path, judge.revision, "judge.path")
    except errors.Unreachable:  # preflight says it is not counted
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
    """The Shape of a built DPO, KTO, ORPO or CPO run (`changes`: fields to plan with instead, e.g.
    batch)."""
    config = hub.model_config(built.model.model_name_or_path, built.model.model_revision)
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
        lora.inference_mode = False  # saved for inference; DPO trains it
    return dataclasses.replace(
        Shape(
            config=config,
            reference_config=hub.model_config(reference.path, reference.revision, "reference.path")
            if reference.strategy == "path"
            else None,
            dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
            lora=lora,
            four_bit=bool(built.model.load_in_4bit),
            checkpointing=bool(args.activation_checkpointing)
            or accelerate_setting(built, "fsdp_activation_checkpointing"),
            reference="none" if built.task in NO_REFERENCE else built.reference.strategy,
            head="logits" if built.task in NO_REFERENCE else "fused",
            chosen_nll=built.task == "orpo" or (built.task == "cpo" and args.cpo_alpha != 0),
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
