"""Load the policy and the reference model the `reference:` option asks for.

| strategy    | policy                      | reference                                  |
| adapter     | base + new LoRA adapter     | the base with the adapter disabled (TRL)   |
| copy        | the model                   | a frozen copy from the same path           |
| path        | the model                   | a frozen model from `reference.path`       |
| precomputed | the model (or + LoRA)       | none held: log-probs computed before training |
| sft_adapter | base + the SFT adapter      | a frozen copy of the SFT adapter (TRL's "ref" adapter) |
"""

from trl.trainer.utils import create_model_from_path

from dpo_recipes import config, hub


def _init_kwargs(built: config.Built) -> dict:
    kwargs = dict(built.args.model_init_kwargs, trust_remote_code=built.args.trust_remote_code)
    if built.quantization is not None:
        kwargs["quantization_config"] = built.quantization
    if built.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # each process holds its own replica
    return kwargs


def _frozen(path: str, built: config.Built):
    return create_model_from_path(path, **_init_kwargs(built)).eval().requires_grad_(False)


def load(built: config.Built):
    """Return (policy, reference, peft_config) for DPOTrainer; a policy given as a path is loaded by TRL."""
    strategy, path = built.reference.strategy, built.model.model_name_or_path
    if strategy == "sft_adapter":
        from peft import PeftModel

        base = create_model_from_path(path, **_init_kwargs(built))
        return PeftModel.from_pretrained(base, built.reference.path, is_trainable=True), None, None
    if strategy == "copy":
        return path, _frozen(path, built), built.peft
    if strategy == "path":
        with hub.fetching("reference model", built.reference.path, "reference.path"):
            return path, _frozen(built.reference.path, built), built.peft
    return path, None, built.peft  # adapter, precomputed: no reference model held


def tokenizer(built: config.Built):
    """The model's tokenizer, with `model.chat_template` applied when one is named."""
    from transformers import AutoTokenizer

    model = built.model
    with hub.fetching("tokenizer of the model", model.model_name_or_path, "model.model_name_or_path"):
        loaded = AutoTokenizer.from_pretrained(
            model.model_name_or_path,
            revision=model.model_revision,
            trust_remote_code=built.args.trust_remote_code,
        )
    if model.chat_template:
        loaded.chat_template = config.chat_template(model.chat_template)
    return loaded


def check_template(tokenizer, dataset, built: config.Built) -> None:
    """Before any weight loads: conversational rows need a chat template."""
    if tokenizer.chat_template is None and isinstance(dataset[0]["prompt"], list):
        raise config.ConfigError(
            [
                f"the data is conversational and the tokenizer of {built.model.model_name_or_path} has no chat "
                "template (a base model's, say): name one with model.chat_template=chatml, llama3 or tiny, "
                "or a .jinja file"
            ]
        )
