"""The tokenizer a run uses, and the check that conversational data has a chat template. The policy and
reference models load as the reference strategy says (reference.py)."""

from dpo_recipes import config, hub


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
