"""Pure row converters: one input row -> TRL's conversational explicit-prompt row, or `Invalid(rule)`.

Output rows are `{"prompt": [messages ending with a user turn], "chosen": [assistant message],
"rejected": [assistant message]}`, or for thumbs-up/down data (format `thumbs`) TRL's unpaired form
`{"prompt": [...], "completion": [assistant message], "label": bool}`. No I/O here: the CLI and
training both run these through `datasets.map` (see `pipeline.py`).
"""

from dataclasses import dataclass, field
from typing import Any

# Every reason a row can be dropped, by name; reports and errors use these names.
RULES = {
    "malformed_line": "a .jsonl line that is not valid JSON",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong type",
    "empty_prompt": "a prompt message is empty or whitespace-only",
    "empty_completion": "chosen or rejected is empty or whitespace-only",
    "identical_pair": "chosen and rejected are the same text",
    "unknown_role": "a message role is not system, user or assistant (or an alias)",
    "bad_role_order": "roles out of order: optional system first, then user/assistant alternating, "
    "the prompt ending with a user turn, each completion one assistant turn",
    "prompt_mismatch": "chosen and rejected carry different prompts, or `prompt` differs from the last user turn",
    "score_tie": "score_chosen equals score_rejected (--drop-ties)",
    "low_margin": "score_chosen - score_rejected is below --min-score-margin",
    "unpaired_surrogate": "a text holds half of a UTF-16 surrogate pair (an escape like \\ud800 alone)",
    "duplicate": "an exact duplicate of an earlier pair",
    "bad_label": "a thumbs row's `label` is neither up nor down (true/false, 1/0, up/down, good/bad, ...)",
}
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
FORMATS = ("alpaca", "ultrafeedback", "sharegpt", "trl", "thumbs", "instruction")
# The answer columns each format writes besides `prompt` (thumbs also writes a bool `label`)
PAIRED = ("chosen", "rejected")
ANSWERS = {"thumbs": ("completion",), "instruction": ("completion",)}
ANSWER_COLUMNS = (*PAIRED, "completion")
LABELS = {  # how thumbs data spells up and down (case-insensitive), besides true/false and 1/0
    **dict.fromkeys(
        ("true", "1", "up", "thumbs_up", "good", "positive", "desirable", "yes", "\U0001f44d"), True
    ),
    **dict.fromkeys(
        ("false", "0", "down", "thumbs_down", "bad", "negative", "undesirable", "no", "\U0001f44e"), False
    ),
}
# conversational: messages (plain strings become user/assistant turns); standard: plain text (messages
# become a transcript, see to_text); auto: standard where the rows are plain strings, else conversational.
STYLES = ("auto", "conversational", "standard")
KEYS = {"sharegpt": ("from", "value")}  # a message's role and content keys; the others: role, content


@dataclass(frozen=True)
class Messages:
    """How the input spells a message, where it is not the format's own way."""

    role_key: str | None = None  # default: `role` (`from` in sharegpt)
    content_key: str | None = None  # default: `content` (`value` in sharegpt)
    roles: dict[str, str] = field(default_factory=dict)  # their role name -> system, user or assistant
    text_key: str | None = None  # the text of a typed content part; default: `text`, else `value`

    def __post_init__(self):  # role name (lower case) -> ours, looked up for every message
        object.__setattr__(self, "role_names", {**ROLES, **{k.lower(): v for k, v in self.roles.items()}})

    def keys(self, format: str) -> tuple[str, str]:
        role, content = KEYS.get(format, ("role", "content"))
        return self.role_key or role, self.content_key or content


class Invalid(Exception):
    """A row breaks `rule`; `detail` says where."""

    def __init__(self, rule: str, detail: str):
        assert rule in RULES, rule
        self.rule, self.detail = rule, detail
        super().__init__(f"{rule}: {detail}")


def _field(row: dict, name: str, *types: type, required: bool = True) -> Any:
    value = row.get(name)
    if value is None:
        if required:
            raise Invalid("missing_field", f"`{name}` is missing")
        return None
    if types and not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise Invalid("wrong_type", f"`{name}` should be {expected}, got {type(value).__name__}")
    return value


def _text(parts: Any, name: str, index: int | None, text_key: str | None) -> str:
    """Content that is not a string: a list of typed parts, whose text parts are joined."""
    try:  # a part that is not an object, or a text that is not a string, fails here
        return "".join(
            [
                part.get(text_key) if text_key else part.get("text", part.get("value"))
                for part in parts
                if part.get("type", "text") == "text"
            ]
        )
    except (AttributeError, TypeError):
        key = f"`{text_key}`" if text_key else "`text` or `value`"
        raise Invalid(
            "wrong_type",
            f"{_where(name, index)} content should be a string or a list of text parts (their {key})",
        ) from None


def _where(name: str, index: int | None) -> str:
    return f"`{name}`" if index is None else f"`{name}`[{index}]"


def _message(
    obj: Any, name: str, keys: tuple[str, str], spelled: "Messages", index: int | None = None
) -> dict:
    """Message `index` of the list `name` (or the message `name` itself) in our form."""
    role, content = (obj.get(keys[0]), obj.get(keys[1])) if isinstance(obj, dict) else (None, None)
    canonical = spelled.role_names.get(role.lower()) if isinstance(role, str) else None
    if canonical is None or content is None:  # rare: find out what is wrong, and say where
        where = _where(name, index)
        if not isinstance(obj, dict):
            raise Invalid("wrong_type", f"{where} should be a message object, got {type(obj).__name__}")
        if role is None or content is None:
            raise Invalid("missing_field", f"{where} has no `{keys[0] if role is None else keys[1]}`")
        raise Invalid("unknown_role", f"{where} has role {role!r}")
    if not isinstance(content, str):
        content = _text(content, name, index, spelled.text_key)
    return {"role": canonical, "content": content}


def _messages(value: Any, name: str, keys: tuple[str, str], spelled: "Messages") -> list[dict]:
    if not isinstance(value, list):
        raise Invalid("wrong_type", f"`{name}` should be a list of messages, got {type(value).__name__}")
    return [_message(m, name, keys, spelled, i) for i, m in enumerate(value)]


def objects_in(row: dict):
    """The objects a row holds in a column or in a list in one: its messages, where it has any."""
    for value in row.values():
        yield from (m for m in (value if isinstance(value, list) else [value]) if isinstance(m, dict))


def extra_keys(row: dict, keys: tuple[str, str]) -> set[str]:
    """Keys of the row's messages besides role and content (a per-message `loss_weight`, say): ignored."""
    return {key for message in objects_in(row) if keys[0] in message for key in message if key not in keys}


def check(prompt: list[dict], chosen: list[dict], rejected: list[dict], system: str | None = None) -> dict:
    """Validate a converted pair: role order, empty text, identical answers."""
    prompt = _prompt(prompt, system)
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        _answer_of(name, completion)
    if chosen[0]["content"] == rejected[0]["content"]:
        raise Invalid("identical_pair", "chosen and rejected are the same text")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _prompt(prompt: list[dict], system: str | None) -> list[dict]:
    """The prompt checked: roles in order, no empty turn. `system`, a row's own system column
    (sharegpt's, or any mapped with --columns system=...), opens it; a conversation that opens with
    another system message is a mismatch."""
    if system and prompt[:1] and prompt[0]["role"] == "system":
        if prompt[0]["content"] != system:
            raise Invalid(
                "prompt_mismatch", "the `system` column differs from the conversation's system turn"
            )
    elif system:
        prompt = [{"role": "system", "content": system}, *prompt]
    roles = [m["role"] for m in prompt]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    if turns != ["user", "assistant"] * (len(turns) // 2) + ["user"]:
        raise Invalid("bad_role_order", f"prompt roles {roles}")
    for i, m in enumerate(prompt):
        if not m["content"].strip() and m["role"] != "system":
            raise Invalid("empty_prompt", f"prompt message {i} ({m['role']}) is empty")
    return prompt


def _answer_of(name: str, completion: list[dict]) -> None:
    if [m["role"] for m in completion] != ["assistant"]:
        raise Invalid(
            "bad_role_order",
            f"`{name}` should be one assistant message, has roles {[m['role'] for m in completion]}",
        )
    if not completion[0]["content"].strip():
        raise Invalid("empty_completion", f"`{name}` is empty")


def _system(row: dict) -> str | None:
    return _field(row, "system", str, required=False)


def _answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _alpaca_prompt(row: dict) -> list[dict]:
    """`instruction` + optional `input` (joined with a blank line), after the turns of `history`."""
    instruction = _field(row, "instruction", str)
    extra = _field(row, "input", str, required=False)
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    prompt = []
    for i, turn in enumerate(_field(row, "history", list, required=False) or []):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise Invalid("wrong_type", f"`history`[{i}] should be a [user, assistant] pair of strings")
        prompt += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt.append({"role": "user", "content": user})
    return prompt


def alpaca(row: dict, spelled: Messages = Messages()) -> dict:
    """`instruction` + optional `input` (joined with a blank line), `system`, `history`; `chosen`/`rejected`
    strings, or `output` as a `[chosen, rejected]` pair."""
    prompt = _alpaca_prompt(row)
    if row.get("chosen") is None and row.get("rejected") is None and row.get("output") is not None:
        pair = _field(row, "output", list)
        if len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            raise Invalid("wrong_type", "`output` should be a [chosen, rejected] pair of strings")
        chosen, rejected = pair
    else:
        chosen, rejected = _field(row, "chosen", str), _field(row, "rejected", str)
    return check(prompt, _answer(chosen), _answer(rejected), _system(row))


def ultrafeedback(row: dict, spelled: Messages = Messages()) -> dict:
    """`chosen` and `rejected` are whole conversations that differ only in the last assistant answer."""
    keys = spelled.keys("ultrafeedback")
    chosen = _messages(_field(row, "chosen", list), "chosen", keys, spelled)
    given = _field(row, "rejected", list)
    if chosen and given and given[:-1] == row["chosen"][:-1]:  # the shared turns, converted once
        rejected = [*chosen[:-1], _message(given[-1], "rejected", keys, spelled, len(given) - 1)]
    else:
        rejected = _messages(given, "rejected", keys, spelled)
    if not chosen or not rejected:
        raise Invalid("empty_completion", "`chosen` or `rejected` has no messages")
    if chosen[:-1] != rejected[:-1]:
        raise Invalid("prompt_mismatch", "chosen and rejected differ before their last message")
    prompt = chosen[:-1]
    stated = _field(row, "prompt", str, required=False)
    last_user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), None)
    if stated is not None and last_user is not None and stated.strip() != last_user.strip():
        raise Invalid("prompt_mismatch", "`prompt` differs from the last user turn")
    return check(prompt, chosen[-1:], rejected[-1:], _system(row))


def sharegpt(row: dict, spelled: Messages = Messages()) -> dict:
    """`conversations` of {from, value} plus `chosen` / `rejected` as single {from, value} messages."""
    keys = spelled.keys("sharegpt")
    prompt = _messages(_field(row, "conversations", list), "conversations", keys, spelled)
    chosen = _message(_field(row, "chosen", dict), "chosen", keys, spelled)
    rejected = _message(_field(row, "rejected", dict), "rejected", keys, spelled)
    return check(prompt, [chosen], [rejected], _system(row))


def _turns(row: dict, name: str, spelled: Messages, wrap) -> list[dict]:
    """Field `name`: a plain string (wrapped as one turn by `wrap`) or a list of messages."""
    value = _field(row, name, str, list)
    return wrap(value) if isinstance(value, str) else _messages(value, name, spelled.keys("trl"), spelled)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def trl(row: dict, spelled: Messages = Messages()) -> dict:
    """TRL's explicit-prompt form, conversational or plain strings (wrapped as user/assistant turns)."""
    prompt = _turns(row, "prompt", spelled, _user)
    chosen, rejected = (_turns(row, k, spelled, _answer) for k in PAIRED)
    return check(prompt, chosen, rejected, _system(row))


def thumbs(row: dict, spelled: Messages = Messages()) -> dict:
    """Thumbs-up/down data, one rated answer a row, in TRL's unpaired form: `prompt` and `completion`
    (plain strings or messages, as in `trl`) and `label` (a bool, 1/0, or a word in LABELS)."""
    prompt = _prompt(_turns(row, "prompt", spelled, _user), _system(row))
    completion = _turns(row, "completion", spelled, _answer)
    _answer_of("completion", completion)
    given = _field(row, "label", bool, int, str)
    label = LABELS.get(str(given).strip().lower()) if not isinstance(given, bool) else given
    if label is None:
        raise Invalid("bad_label", f"`label` is {given!r}")
    return {"prompt": prompt, "completion": completion, "label": label}


def instruction(row: dict, spelled: Messages = Messages()) -> dict:
    """Instruction data for supervised fine-tuning, one answer a row: alpaca's `instruction` (with its
    `input`, `system`, `history`) and an `output` string, or `prompt` and `completion` as in `thumbs`;
    written in the unpaired form, every answer rated up."""
    if "instruction" in row:
        prompt, completion = _alpaca_prompt(row), _answer(_field(row, "output", str))
    else:
        prompt = _turns(row, "prompt", spelled, _user)
        completion = _turns(row, "completion", spelled, _answer)
    _answer_of("completion", completion)
    return {"prompt": _prompt(prompt, _system(row)), "completion": completion, "label": True}


CONVERTERS = {
    "alpaca": alpaca,
    "ultrafeedback": ultrafeedback,
    "sharegpt": sharegpt,
    "trl": trl,
    "thumbs": thumbs,
    "instruction": instruction,
}


def to_text(pair: dict, row: dict) -> dict:
    """The standard style of a converted pair: a row given as plain strings (TRL's standard form) keeps
    them as they are; messages become a transcript (to_standard)."""
    sides = ("prompt", *(k for k in ANSWER_COLUMNS if k in pair))
    if all(isinstance(row.get(k), str) for k in sides) and [m["role"] for m in pair["prompt"]] == ["user"]:
        return {**pair, **{k: row[k] for k in sides}}
    return to_standard(pair)


def to_standard(row: dict) -> dict:
    """Plain strings for base models without a chat template, one rule for every row: the prompt is a
    role-labelled transcript ending in "Assistant:" ("User: Hi.\n\nAssistant:"), each answer starts with
    the space that separates it from the prompt (" Hello!"), as in TRL's standard format."""
    text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in row["prompt"]) + "\n\nAssistant:"
    answers = {k: " " + row[k][0]["content"] for k in ANSWER_COLUMNS if k in row}
    return {**row, "prompt": text, **answers}
