"""Files the project ships gzipped (the real Qwen2.5 tokenizer, real preference data), unpacked on first
use into the cache, where the tiny models are built too. Nothing outside the project is read."""

import gzip
import hashlib
import os
import shutil
from pathlib import Path

from data_prep.io import atomic_path
from dpo_recipes import ROOT


def cache_dir() -> Path:
    return Path(os.environ.get("DPO_RECIPES_CACHE") or Path.home() / ".cache" / "dpo_recipes")


def unpacked(relative: str) -> Path:
    """The project's file or folder `relative` (to the project root) with every `.gz` in it decompressed.

    A file kept as `<name>.gz` and a folder holding `.gz` files are unpacked once into the cache, under
    a hash of their bytes, so an updated asset is unpacked afresh; plain files are used where they are.
    """
    source = ROOT / relative
    packed = source.with_name(source.name + ".gz")
    if source.is_file():
        return source
    if packed.is_file():
        files = {source.name: packed}
    elif source.is_dir():
        files = {p.name: p for p in sorted(source.iterdir()) if p.is_file()}
    else:
        raise FileNotFoundError(f"{relative}: not in the project (neither {source} nor {packed} exists)")
    digest = hashlib.sha256()
    for name, path in files.items():
        digest.update(name.encode() + b"\0" + path.read_bytes())
    home = cache_dir() / "assets" / digest.hexdigest()[:16]
    target = home / source.name
    if target.exists():
        return target
    with atomic_path(target, existing="keep") as staging:  # parallel first uses cannot clash
        folder = staging if source.is_dir() else staging.parent
        folder.mkdir(exist_ok=True)
        for name, path in files.items():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as f, open(folder / name.removesuffix(".gz"), "wb") as out:
                shutil.copyfileobj(f, out)
    return target
