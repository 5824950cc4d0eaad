"""Updates that land. Near a weight of 0.02, bf16's spacing is 1.2e-4; an AdamW step moves a weight by
about the learning rate (5e-7 in a full 7B DPO run), so a weight stored in bf16 keeps its value and the
run does not train. Full fine-tuning therefore keeps fp32 master weights on every engine:

| engine       | fp32 masters                                                                       |
| single, ddp  | the policy loaded in fp32 and run under autocast (train.bf16 / fp16), as AMP does   |
| deepspeed    | its optimizer's fp32 partitions (ds_zero*.json: bf16.enabled follows train.bf16)   |
| fsdp         | accelerate upcasts the trainable weights to fp32 under mixed precision             |
| LoRA         | PEFT keeps the adapters in fp32 over a bf16 base (autocast_adapter_dtype)          |

Low-precision weights without masters are refused before any weight loads, unless
hardware.master_weights=false says so knowingly. Every run also measures what it lost (UpdateProbe).
"""

LOW = ("bfloat16", "float16", "bf16", "fp16", "half")
FIXES = (
    "train.bf16=true (fp32 master weights under bf16 autocast; it runs on CPU too), or model.dtype=float32, "
    "or hardware=zero3 / hardware=fsdp with train.bf16=true (their own fp32 masters); to train the "
    "low-precision weights as they are, hardware.master_weights=false"
)


def mixed(train: dict) -> bool:
    return bool(train.get("bf16") or train.get("fp16"))


def upcast(engine: str, lora: bool, train: dict, master_weights: bool) -> bool:
    """Whether the policy loads in fp32 as its own masters: full fine-tuning under autocast on an engine
    that keeps no masters of its own."""
    return master_weights and not lora and engine in ("single", "ddp") and mixed(train)


def problems(v) -> list[str]:
    """A full fine-tune whose weights are stored in low precision with no fp32 masters (rules.View)."""
    dtype = str(v.model.get("dtype")).removeprefix("torch.")
    if v.lora or dtype not in LOW or not v.hardware.master_weights or mixed(v.train) or v.task != "dpo":
        return []
    return [
        f"model.dtype={dtype}: full fine-tuning with {dtype} weights and no fp32 master weights loses "
        f"most updates to rounding (an AdamW step at lr {v.train.get('learning_rate', 1e-6):g} on a weight "
        f"of 0.02 is below {dtype}'s spacing there); set {FIXES}"
    ]


def note(built) -> str | None:
    """What a run whose weights load in fp32 as their own masters says of it (config.build set it)."""
    stored, asked = (built.args.model_init_kwargs or {}).get("dtype"), built.model.dtype or "auto"
    if stored != "float32" or str(asked).removeprefix("torch.") == "float32":
        return None
    kind = "bf16" if built.args.bf16 else "fp16"
    return (
        f"note: full fine-tuning under {kind} autocast: the weights are stored in fp32, as their own master "
        f"weights, and computed in {kind} (model.dtype={asked} stores them as loaded: "
        "hardware.master_weights=false)"
    )
