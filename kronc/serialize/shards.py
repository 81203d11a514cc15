"""Safetensors shards on both sides of a streamed compile.

* `Checkpoint`: a Hugging Face folder's weights (``model.safetensors`` or the shards listed in
  ``model.safetensors.index.json``), read one tensor group at a time with ``safetensors.safe_open``
  (only the requested tensors are read from disk). `Checkpoint.open` reads every shard's header
  first, so a missing shard or a tensor whose shape differs from what the config builds is a one-line
  error before any work starts.
* `write_shard` / `read_shards`: the weight files of a sharded kronc save. Each shard is listed in the
  manifest with its size and SHA-256 (`serialize.read_weights` reads them through `read_shards`).

This module imports only `kronc.inputs` (for its error class) and `serialize.files`; the error class of
`read_shards` is passed in by the caller.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..inputs import InputError
from .files import sha256

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(InputError):
    """A Hugging Face folder's weights cannot be streamed: missing or mismatched shards, no config."""


@dataclass
class Checkpoint:
    """Where every tensor of a Hugging Face checkpoint lives, and its stored shape and dtype."""

    folder: Path
    files: dict[str, str]
    """Tensor name -> shard file name."""
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path) -> Checkpoint:
        """Read the index (or the single file) and every shard's header; `CheckpointError` in one line when
        a listed shard is missing or does not hold the tensors the index says it does."""
        from safetensors import SafetensorError, safe_open

        folder = Path(folder)
        index, single = folder / INDEX, folder / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index (no readable weight_map): {e}") from e
            files = {str(k): str(v) for k, v in weight_map.items()}
        elif single.is_file():
            files = {}
        else:
            raise CheckpointError(f"{folder} has no {SINGLE} or {INDEX}: streamed compile reads safetensors checkpoints")
        shards = sorted(set(files.values())) or [SINGLE]
        ckpt = cls(folder, files)
        for name in shards:
            path = folder / name
            if not path.is_file():
                listed = [k for k, v in files.items() if v == name]
                raise CheckpointError(f"{path} is missing: {INDEX} lists {len(listed)} tensors in it (e.g. {listed[0]})")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        info = f.get_slice(key)
                        ckpt.shapes[key] = tuple(int(n) for n in info.get_shape())
                        ckpt.dtypes[key] = str(info.get_dtype())
                        if not index.is_file():
                            ckpt.files[key] = name
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
        absent = [k for k, v in files.items() if k not in ckpt.shapes]
        if absent:
            raise CheckpointError(f"{folder / files[absent[0]]} does not hold {absent[0]}, which {INDEX} places there "
                                  f"({len(absent)} such tensors)")
        return ckpt

    def check(self, expected: Mapping[str, tuple[int, ...]], aliases: Mapping[str, Sequence[str]]) -> None:
        """Every tensor the skeleton expects is stored (under its name or a tied alias) with its shape."""
        for name, shape in expected.items():
            stored = self.find(name, aliases.get(name, ()))
            if stored is None:
                raise CheckpointError(f"no shard in {self.folder} holds {name} (the config's model needs it)")
            if self.shapes[stored] != tuple(shape):
                raise CheckpointError(
                    f"{self.folder / self.files[stored]}: {stored} is {list(self.shapes[stored])} but the config makes it "
                    f"{list(shape)}: the shards do not belong to this config.json"
                )

    def find(self, name: str, aliases: Iterable[str] = ()) -> str | None:
        """The stored name of ``name`` (itself, or the first tied alias that is stored)."""
        for n in (name, *aliases):
            if n in self.files:
                return n
        return None

    def load(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The named tensors, each shard opened once."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out: dict[str, Tensor] = {}
        for file, keys in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out

    def nbytes(self, names: Iterable[str]) -> int:
        """Bytes the named tensors take once loaded as float32 (what the skeleton holds)."""
        total = 0
        for n in names:
            numel = 1
            for d in self.shapes[n]:
                numel *= d
            total += numel * 4
        return total


# --------------------------------------------------------------------------- kronc save shards


def shard_name(index: int, total: int) -> str:
    """``model-00001-of-00004.safetensors``: the Hugging Face convention, 1-based."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def write_shard(folder: Path, name: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, Any]:
    """Write one weight shard; return its manifest entry (file, bytes, SHA-256, tensor names)."""
    from safetensors.torch import save_file

    path = folder / name
    save_file(dict(tensors), str(path), metadata=dict(metadata))
    return {"file": name, "bytes": path.stat().st_size, "sha256": sha256(path), "names": sorted(tensors)}


def check_shard_file(folder: Path, entry: Mapping[str, Any], *, verify: bool, error: type[Exception]) -> Path:
    """The path of one listed shard after checking that it exists, its size and (``verify``) its SHA-256, without
    loading it (the file is hashed in 1 MiB blocks); ``error`` in one line for a missing, truncated or corrupted shard."""
    file = folder / str(entry.get("file"))
    if not file.is_file():
        raise error(f"{file} is missing (the manifest lists it as a weight shard)")
    size = file.stat().st_size
    if isinstance(entry.get("bytes"), int) and size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "corrupted"
        raise error(f"{file} is {what}: {size} bytes, the manifest says {entry['bytes']}")
    if verify and not isinstance(entry.get("sha256"), str):
        raise error(f"the manifest has no SHA-256 checksum for {file.name} (load with verify=False to skip the check)")
    if verify and sha256(file) != entry["sha256"]:
        raise error(f"{file} is corrupted: its SHA-256 does not match the manifest")
    return file


def read_shards(folder: Path, shards: Sequence[Mapping[str, Any]], *, verify: bool, error: type[Exception]) -> dict[str, Tensor]:
    """Every tensor of the listed shards, each checked for size and (``verify``) checksum; ``error`` is raised
    in one line for a missing, truncated or corrupted shard, or a tensor stored in two shards."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, Tensor] = {}
    for entry in shards:
        file = check_shard_file(folder, entry, verify=verify, error=error)
        try:
            part = load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise error(f"{file} is corrupted or truncated: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        twice = sorted(set(part) & set(out))
        if twice:
            raise error(f"{file} holds {twice[0]}, which another shard holds too")
        out.update(part)
    return out




def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


__all__ = ["Checkpoint", "CheckpointError", "check_shard_file", "read_shards", "shard_name", "write_shard"]
