"""The tokenizer a run uses, and the checks that conversational data and the chat template fit it. The
policy and reference models load as the reference strategy says (reference.py)."""

import re

from dpo_recipes import config, errors
from dpo_recipes.config import schema
from dpo_recipes.sources import hub

# The turn markers a template writes: <|im_start|>, <|eot_id|>, <start_of_turn>, </s>.
MARKER = re.compile(r"<\|[^<>|\s]+\|>|</?[A-Za-z_]\w*>")
PROBE = [
    {"role": "user", "content": "PROBE-USER-7f3a"},
    {"role": "assistant", "content": "PROBE-ANSWER-7f3a"},
]


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
        loaded.chat_template = schema.chat_template(model.chat_template)
    return loaded


def check_template(tokenizer, dataset, built: config.Built) -> list[str]:
    """Before any weight loads, for conversational rows: a chat template whose turn markers are this
    tokenizer's own tokens. An assistant turn that ends with a marker other than EOS makes that marker
    the tokenizer's EOS (saved with the model), so the trained model stops where it learned to. Returns
    what was changed or is worth knowing, in words."""
    if not isinstance(dataset[0]["prompt"], list):
        return []  # plain text: TRL's standard path writes the tokenizer's BOS and adds EOS
    name = built.model.model_name_or_path
    whose = "model.chat_template" if built.model.chat_template else f"the chat template of {name}"
    if tokenizer.chat_template is None:
        raise errors.ConfigError(
            [
                f"the data is conversational and the tokenizer of {name} has no chat template (a base "
                "model's, say): train it as plain text with dataset.style=standard, or name a template "
                f"with model.chat_template={', '.join(sorted(schema.chat_templates()))} or a .jinja file, "
                "whose markers the tokenizer holds as tokens"
            ]
        )
    _check_system_role(tokenizer, dataset, whose)
    text = tokenizer.apply_chat_template(PROBE, tokenize=False)
    split = {m: n for m in dict.fromkeys(MARKER.findall(text)) if (n := len(_ids(tokenizer, m))) > 1}
    if split:
        pieces = ", ".join(f"{m!r} ({n} pieces)" for m, n in split.items())
        raise errors.ConfigError(
            [
                f"{whose}: its turn markers are not tokens of this tokenizer: {pieces}; the model would read "
                "them as text and never learn where a turn ends. Train plain text with dataset.style=standard "
                "(TRL writes the tokenizer's BOS and EOS), or use a template written with the tokenizer's own "
                "special tokens"
            ]
        )
    notes, answer = [], PROBE[1]["content"]
    trailer = text.split(answer, 1)[1] if answer in text else ""
    end = (MARKER.findall(trailer) or [trailer.strip()])[0]
    if trailer and not (tokenizer.eos_token and tokenizer.eos_token in trailer):
        if not end or len(_ids(tokenizer, end)) != 1:
            raise errors.ConfigError(
                [
                    f"{whose} ends an assistant turn with {trailer!r}, not with the tokenizer's EOS "
                    f"{tokenizer.eos_token!r}: the model would not learn to stop. Use a template that ends "
                    "turns with an EOS or a special token, or dataset.style=standard"
                ]
            )
        notes.append(f"EOS set to {end!r} (was {tokenizer.eos_token!r}): the template ends each turn with it")
        tokenizer.eos_token = end
    bos = tokenizer.bos_token
    if bos and _ids(tokenizer, "x", True)[:1] == [tokenizer.bos_token_id] and not text.startswith(bos):
        notes.append(f"{whose} writes no BOS ({bos!r}), which this tokenizer puts before plain text")
    return notes


def _check_system_role(tokenizer, dataset, whose: str) -> None:
    """Rows with a system message need a template that takes one (Gemma's refuses it)."""
    from jinja2 import TemplateError

    rows = [i for i, prompt in enumerate(dataset["prompt"]) if prompt and prompt[0]["role"] == "system"]
    if not rows:
        return
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "PROBE-SYSTEM"}, *PROBE], tokenize=False)
    except TemplateError as err:
        raise errors.ConfigError(
            [
                f"{whose} refuses a system message ({err}), and {len(rows)} of {len(dataset)} training rows open "
                f"with one (the first: row {rows[0]}). Fold it into the first user turn with a template that "
                "does (model.chat_template=gemma_system for Gemma), or remove the system messages from the data"
            ]
        ) from None


def stops(tokenizer, generation_config) -> list[int]:
    """Where generation ends: the model's own EOS ids and the tokenizer's (the template's end of turn,
    where check_template made it EOS)."""
    own = generation_config.eos_token_id if generation_config is not None else None
    found = {*(own if isinstance(own, list) else [own]), tokenizer.eos_token_id}
    return sorted(i for i in found if i is not None)


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]
