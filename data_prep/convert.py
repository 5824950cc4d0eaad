"""Pure row converters: one input row -> TRL's conversational explicit-prompt row, or `Invalid(rule)`.

Output rows are `{"prompt": [messages ending with a user turn], "chosen": [assistant message],
"rejected": [assistant message]}`. No I/O here: the CLI and training both run these through
`datasets.map` (see `pipeline.py`).
"""

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
    "duplicate": "an exact duplicate of an earlier pair",
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
FORMATS = ("alpaca", "ultrafeedback", "sharegpt", "trl")


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


def _text(value: Any, where: str) -> str:
    """Message content: a string, or a list of typed parts whose text parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = [p.get("text") for p in value if p.get("type", "text") == "text"]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise Invalid("wrong_type", f"{where} content should be a string or a list of text parts")


def _message(obj: Any, where: str, role_key: str = "role", content_key: str = "content") -> dict:
    if not isinstance(obj, dict):
        raise Invalid("wrong_type", f"{where} should be a message object, got {type(obj).__name__}")
    for key in (role_key, content_key):
        if obj.get(key) is None:
            raise Invalid("missing_field", f"{where} has no `{key}`")
    role = obj[role_key]
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise Invalid("unknown_role", f"{where} has role {role!r}")
    return {"role": ROLES[role.lower()], "content": _text(obj[content_key], where)}


def _messages(value: Any, name: str, role_key: str = "role", content_key: str = "content") -> list[dict]:
    if not isinstance(value, list):
        raise Invalid("wrong_type", f"`{name}` should be a list of messages, got {type(value).__name__}")
    return [_message(m, f"`{name}`[{i}]", role_key, content_key) for i, m in enumerate(value)]


def check(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> dict:
    """Validate a converted pair: role order, empty text, identical answers."""
    roles = [m["role"] for m in prompt]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    if (
        not turns
        or turns[-1] != "user"
        or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(turns))
    ):
        raise Invalid("bad_role_order", f"prompt roles {roles}")
    for i, m in enumerate(prompt):
        if not m["content"].strip() and m["role"] != "system":
            raise Invalid("empty_prompt", f"prompt message {i} ({m['role']}) is empty")
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if [m["role"] for m in completion] != ["assistant"]:
            raise Invalid(
                "bad_role_order",
                f"`{name}` should be one assistant message, has roles {[m['role'] for m in completion]}",
            )
        if not completion[0]["content"].strip():
            raise Invalid("empty_completion", f"`{name}` is empty")
    if chosen[0]["content"] == rejected[0]["content"]:
        raise Invalid("identical_pair", "chosen and rejected are the same text")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def alpaca(row: dict) -> dict:
    """`instruction` + optional `input` (joined with a blank line), `system`, `history`; `chosen`/`rejected`
    strings, or `output` as a `[chosen, rejected]` pair."""
    instruction = _field(row, "instruction", str)
    extra = _field(row, "input", str, required=False)
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    prompt = []
    system = _field(row, "system", str, required=False)
    if system:
        prompt.append({"role": "system", "content": system})
    for i, turn in enumerate(_field(row, "history", list, required=False) or []):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise Invalid("wrong_type", f"`history`[{i}] should be a [user, assistant] pair of strings")
        prompt += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt.append({"role": "user", "content": user})
    if row.get("chosen") is None and row.get("rejected") is None and row.get("output") is not None:
        pair = _field(row, "output", list)
        if len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            raise Invalid("wrong_type", "`output` should be a [chosen, rejected] pair of strings")
        chosen, rejected = pair
    else:
        chosen, rejected = _field(row, "chosen", str), _field(row, "rejected", str)
    return check(prompt, _answer(chosen), _answer(rejected))


def ultrafeedback(row: dict) -> dict:
    """`chosen` and `rejected` are whole conversations that differ only in the last assistant answer."""
    chosen = _messages(_field(row, "chosen", list), "chosen")
    rejected = _messages(_field(row, "rejected", list), "rejected")
    if not chosen or not rejected:
        raise Invalid("empty_completion", "`chosen` or `rejected` has no messages")
    if chosen[:-1] != rejected[:-1]:
        raise Invalid("prompt_mismatch", "chosen and rejected differ before their last message")
    prompt = chosen[:-1]
    stated = _field(row, "prompt", str, required=False)
    last_user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), None)
    if stated is not None and last_user is not None and stated.strip() != last_user.strip():
        raise Invalid("prompt_mismatch", "`prompt` differs from the last user turn")
    return check(prompt, chosen[-1:], rejected[-1:])


def sharegpt(row: dict) -> dict:
    """`conversations` of {from, value} plus `chosen` / `rejected` as single {from, value} messages."""
    prompt = _messages(_field(row, "conversations", list), "conversations", "from", "value")
    chosen = _message(_field(row, "chosen", dict), "`chosen`", "from", "value")
    rejected = _message(_field(row, "rejected", dict), "`rejected`", "from", "value")
    return check(prompt, [chosen], [rejected])


def trl(row: dict) -> dict:
    """TRL's explicit-prompt form, conversational or plain strings (wrapped as user/assistant turns)."""
    prompt, chosen, rejected = (_field(row, k, str, list) for k in ("prompt", "chosen", "rejected"))
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
    chosen = _answer(chosen) if isinstance(chosen, str) else _messages(chosen, "chosen")
    rejected = _answer(rejected) if isinstance(rejected, str) else _messages(rejected, "rejected")
    return check(prompt, chosen, rejected)


CONVERTERS = {"alpaca": alpaca, "ultrafeedback": ultrafeedback, "sharegpt": sharegpt, "trl": trl}


def to_standard(row: dict) -> dict:
    """Plain strings for base models without a chat template: a lone user turn is the prompt as is;
    longer prompts become a role-labelled transcript ending in "Assistant:", answers then start with a space."""
    prompt = row["prompt"]
    if len(prompt) == 1:
        text, lead = prompt[0]["content"], ""
    else:
        text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt) + "\n\nAssistant:"
        lead = " "
    answers = {k: lead + row[k][0]["content"] for k in ("chosen", "rejected")}
    return {**row, "prompt": text, **answers}
