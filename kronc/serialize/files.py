"""What a saved directory is called and holds, the error for one that cannot be read, and small file helpers.

Every other module of `kronc.serialize` names files and reports problems through these, so a saved
directory's layout and its error messages are written down once.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

FORMAT_VERSION = 1
"""Version of the saved-directory layout; `load` refuses any other."""
MANIFEST = "kronc.json"
WEIGHTS = "model.safetensors"
EXAMPLES = "example_inputs.safetensors"

ModelArg = nn.Module | Callable[[], nn.Module] | str | None


class KroncFileError(ValueError):
    """A saved kronc model cannot be read: missing, corrupted, truncated, from an unknown format
    version, or not matching the architecture it is loaded into."""


def directory(path: str | Path) -> Path:
    """The saved directory, also when given the path of its manifest."""
    path = Path(path)
    return path.parent if path.name == MANIFEST and path.is_file() else path


def dtype_named(name: object) -> torch.dtype | None:
    """The torch dtype a manifest names (``"float16"``), or None for anything else."""
    if not isinstance(name, str):
        return None
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def sha256(file: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (weights files can be larger than memory allows twice)."""
    h = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def few(keys: list[str], n: int = 3) -> str:
    """The first ``n`` keys and how many more: error messages stay one line for any model size."""
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def first_line(e: BaseException) -> str:
    """The first line of an error (at most 300 characters), for one-line messages that wrap another error."""
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def version(package: str) -> str | None:
    """The installed version of ``package``, or None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def replace_dir(new: Path, path: Path) -> None:
    """Move the finished folder ``new`` to ``path``; an earlier ``path`` is removed only once ``new`` is there."""
    if not path.exists():
        os.replace(new, path)
        return
    old = path.parent / f".{path.name}.kronc-old-{secrets.token_hex(6)}"
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse to save into ``path`` when it is a file, or a non-empty folder that is not a kronc save
    (unless ``overwrite``): a save replaces the whole folder."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and not overwrite and not (path / MANIFEST).is_file() and any(path.iterdir()):
        raise FileExistsError(f"{path} is a non-empty folder that is not a kronc save: choose another path "
                              "or pass overwrite=True to replace everything in it")


def temp_name(path: Path) -> str:
    """The hidden sibling folder a save of ``path`` is written into before it is renamed into place."""
    return f".{path.name}.kronc-tmp-{secrets.token_hex(6)}"
