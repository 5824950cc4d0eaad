"""A model, tokenizer or dataset that cannot be fetched from the Hugging Face Hub ends the run with one
message naming it and the two fixes, never a traceback from deep inside transformers or datasets. A
model's config.json is read from here too, with the copies the project ships for planning offline."""

import contextlib
from pathlib import Path

from dpo_recipes import ROOT
from dpo_recipes.errors import Unreachable

DATA_FILES = {".json", ".jsonl", ".parquet"}


def cause(err: Exception) -> str:
    """The first line of what the Hub client said, for a one-line message."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def missing_local(path: str, key: str) -> str | None:
    """A problem line for a path meant to be local (it starts with . / ~, has more than one /, or ends
    in a data file's suffix) that does not exist; a hub id has at most one /."""
    local = path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).suffix in DATA_FILES
    if Path(path).expanduser().exists() or not local:
        return None
    return f"{key}: {path} is neither a local folder or file nor a hub id"


@contextlib.contextmanager
def fetching(what: str, repo: str, key: str):
    """Turn a failed download of `repo` into Unreachable; errors reading local files pass through."""
    try:
        yield
    except (OSError, ConnectionError) as err:
        if Path(repo).expanduser().exists():
            raise
        dataset = what == "dataset"
        raise Unreachable(
            f"cannot fetch the {what} {repo!r} from the Hugging Face Hub ({cause(err)}). Either download it "
            f"first: `hf download {repo}{' --repo-type dataset' if dataset else ''}` (then it is found in "
            f"the cache, also offline), or set {key} to a local {'file or folder' if dataset else 'folder'}"
        ) from None


# Configs of the shipped recipes' hub models, for planning on a machine that has not downloaded them
# (assets/model_configs/README.md gives their source).
SHIPPED_CONFIGS = ROOT / "assets" / "model_configs"


def model_config(name: str, revision: str | None = None, key: str = "model.model_name_or_path"):
    """The model's config.json: a local folder, the hub cache or the hub, else the copy the project ships."""
    from transformers import AutoConfig

    shipped = SHIPPED_CONFIGS / name.replace("/", "--") / "config.json"
    try:
        return AutoConfig.from_pretrained(name, revision=revision, local_files_only=True)
    except OSError:
        if shipped.is_file():
            return AutoConfig.from_pretrained(shipped.parent)
    with fetching("model", name, key):
        return AutoConfig.from_pretrained(name, revision=revision)
