"""What counts as a credential in a config: a key named like one (at any depth) or a value shaped like one.
A run saves its config (.hydra/, summary.json, wandb's copy), so a credential there would reach disk."""

import re

NAME = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|access_?key|credentials?)$", re.I)
SPECIAL_TOKEN = re.compile(r"^(pad|bos|eos|unk|sep|cls|mask)_token$")  # a tokenizer's, not a credential
VALUE = re.compile(r"\bhf_[A-Za-z0-9]{30,}|\bsk-[A-Za-z0-9_-]{20,}")  # Hugging Face, OpenAI-style keys
HEX40 = re.compile(r"(local-)?[0-9a-f]{40}")  # a wandb key, or the commit hash of a revision
FIX = (
    "holds a secret, and the config is saved with the run (.hydra/, summary.json, wandb); put it in the "
    "environment instead (HF_TOKEN, WANDB_API_KEY), where the libraries read it"
)


def secret(path: str, value) -> bool:
    """Whether the value at `path` (`train.model_init_kwargs.token`) is a credential. A set flag is not."""
    if not isinstance(value, str) or not value:
        return False
    name = path.rsplit(".", 1)[-1].split("[", 1)[0]
    if NAME.search(name) and not SPECIAL_TOKEN.match(name):
        return True
    return bool(VALUE.search(value)) or bool(HEX40.fullmatch(value) and re.search("wandb|key", path, re.I))


def leaves(node, path: str = ""):
    """(path, value) of every leaf of nested dicts and lists: `a.b[0].c`."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        yield path, node
        return
    for key, value in items:
        yield from leaves(value, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip("."))


def found(config: dict) -> list[str]:
    """A problem line for each credential in a (composed, unresolved) config."""
    return [f"{path}: {FIX}" for path, value in leaves(config) if secret(path, value)]


def in_overrides(overrides: list[str]) -> list[str]:
    """The same for command-line overrides (`++train.hub_token=hf_...`), before anything is composed."""
    pairs = [o.lstrip("+~").split("=", 1) for o in overrides if "=" in o]
    return [f"{key}: {FIX}" for key, value in pairs if secret(key, value)]
