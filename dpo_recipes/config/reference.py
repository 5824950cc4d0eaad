"""Reference strategies, one row each in STRATEGIES: what a strategy needs from the config, and the
policy, reference and PEFT config it hands DPOTrainer. `reference=<name>` picks one (conf/reference/);
`auto` is `adapter` for a LoRA model option and `copy` for full fine-tuning.

| strategy    | policy                  | reference                                              |
| adapter     | base + new LoRA adapter | the base with the adapter disabled (TRL)               |
| copy        | the model               | a copy TRL loads from the same path, used without grad |
| path        | the model               | a frozen model from `reference.path`                   |
| precomputed | the model (or + LoRA)   | none held: log-probs computed before training          |
| sft_adapter | base + the SFT adapter  | a frozen copy of the SFT adapter (TRL's "ref" adapter) |
"""

from collections.abc import Callable
from dataclasses import dataclass

from dpo_recipes.sources import hub


@dataclass(frozen=True)
class Strategy:
    load: Callable  # Built -> (policy or its path, reference model or None, PEFT config or None)
    path: str | None = None  # what `reference.path` must name, for a strategy that reads it
    lora_only: bool = False
    precompute: bool = False  # the strategy that sets train.precompute_ref_log_probs
    no_sync: str | None = None  # why TR-DPO (train.sync_ref_model) cannot update this reference


def _create(path: str, built, revision: str | None = None):
    """A model from `path` loaded as the policy is (dtype, attention, quantization, load flags), at
    `revision` where it is another model than the policy's."""
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(built.args.model_init_kwargs, trust_remote_code=built.args.trust_remote_code)
    if path != built.model.model_name_or_path:
        kwargs["revision"] = revision
    if built.quantization is not None:
        kwargs["quantization_config"] = built.quantization
    if built.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # each process holds its own replica
    return create_model_from_path(path, **kwargs)


def _by_trl(built):
    """TRL builds what it needs: the base with the adapter disabled, a copy from the policy's path, or
    nothing when the log-probs are precomputed."""
    return built.model.model_name_or_path, None, built.peft


def _from_path(built):
    with hub.fetching("reference model", built.reference.path, "reference.path"):
        reference = (
            _create(built.reference.path, built, built.reference.revision).eval().requires_grad_(False)
        )
    return built.model.model_name_or_path, reference, built.peft


def _sft_adapter(built):
    from peft import PeftModel

    base = _create(built.model.model_name_or_path, built)
    return PeftModel.from_pretrained(base, built.reference.path, is_trainable=True), None, None


ADAPTER_SYNC = "TR-DPO needs a separate reference model, not a LoRA adapter"
STRATEGIES = {
    "adapter": Strategy(_by_trl, lora_only=True, no_sync=ADAPTER_SYNC),
    "copy": Strategy(_by_trl),
    "path": Strategy(_from_path, path="the reference model's path or hub id"),
    "precomputed": Strategy(
        _by_trl, precompute=True, no_sync="precomputed reference log-probs cannot follow a synced reference"
    ),
    "sft_adapter": Strategy(_sft_adapter, path="the SFT LoRA adapter's folder", no_sync=ADAPTER_SYNC),
}


def resolve(name: str, lora: bool) -> str:
    return ("adapter" if lora else "copy") if name == "auto" else name


def problems(name: str, path: str | None, train: dict, lora: bool) -> list[str]:
    """What the config lacks or contradicts for reference strategy `name` (resolved)."""
    row, found = STRATEGIES[name], []
    if row.path and not path:
        found.append(f"reference.path: reference={name} needs {row.path}")
    if row.lora_only and not lora:
        found.append(f"reference={name} needs a LoRA model option (model.use_peft=true); use reference=copy")
    if train.get("precompute_ref_log_probs") and not row.precompute:
        found.append("train.precompute_ref_log_probs: set it through reference=precomputed")
    if train.get("sync_ref_model") and (row.no_sync or lora):
        found.append(
            f"train.sync_ref_model: {row.no_sync or ADAPTER_SYNC}; use a full fine-tuning model option "
            "with reference=copy"
        )
    return found


def load(built) -> tuple:
    """(policy or its path, reference model or None, PEFT config or None) for DPOTrainer."""
    return STRATEGIES[built.reference.strategy].load(built)
