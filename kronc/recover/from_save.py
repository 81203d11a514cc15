"""Sharded recovery that starts from a kronc save folder and ends in one, never holding the whole student.

The FSDP2 recipe for models larger than one rank's memory, on kronc's own folders:

1. `open_saved`: the student is rebuilt on the meta device (`kronc.load(folder, device="meta")`: compressed
   modules with their stored shapes and dtypes, no storage; every shard's size and SHA-256 checked first).
2. `kronc.recover.sharding.sharded` shards it as it shards a built student (FSDP2 per block, then the root),
   allocates it with ``to_empty`` and calls `fill`: each rank reads only its own dim-0 chunk of every parameter
   from the safetensors files (``safe_open(...).get_slice``, the rows FSDP2 gives the rank: ``torch.chunk``
   over the world), and buffers (quantized codes, stored fp16 scales, sparse indices) whole, as FSDP2 keeps
   them. The trained-scale parameters (`kronc.recover.scales`) start at their fixed values (factor 1, shift 0);
   buffers no file stores (rotary frequencies) are recomputed by the model's own init
   (`kronc.scale.skeleton.recompute_buffers`).
3. Training is `kronc.recover.loop.distill`, unchanged.
4. `write`: per unit (each block, then the rest), every rank gathers that unit's parameters whole
   (``DTensor.full_tensor``, a collective), stores its trained scales back (``commit_scales``), and the rank that
   owns the unit (round-robin, as the streamed compile's save: `kronc.scale.distributed.owns`) writes it as one
   shard; the unit then goes back to the meta device. Rank 0 writes the manifest last and renames the folder into
   place (`kronc.scale.save.SaveWriter`): a failed run leaves no folder that looks like a save.

Per rank, memory is its shards of the parameters (and of gradients and AdamW state while training), the
buffers whole, and one unit gathered whole at a time (FSDP2's forward, and `write`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..scale import distributed as dist
from ..scale.save import COPIED, SaveWriter
from ..scale.skeleton import recompute_buffers, release_memory
from ..serialize import KroncFileError
from ..serialize.reader import load, read_manifest, stored_layout
from ..state_dicts import dedupe, unshared
from ..values import QuantizedTensor
from .config import RecoveryError

START = {"scales_train": 1.0, "minima_train": 0.0}
"""Parameters no save stores: the trained-scale factors and shifts `QuantizedTensor.train_scales` makes, with the
values they start from (a factor of 1, a shift of 0: the stored scales as they are)."""


@dataclass
class SavedStudent:
    """Where a meta-device student's tensors are (file, shape, dtype by stored name) and where the result goes."""

    folder: Path
    manifest: dict[str, Any]
    layout: dict[str, tuple[Path, list[int], str]]
    out: Path


def is_unbuilt(student: Any) -> bool:
    """Whether ``student`` is a save folder or a model whose tensors are on the meta device (recovered from its folder)."""
    return isinstance(student, str | Path) or (isinstance(student, nn.Module) and any(
        t.is_meta for t in (*student.parameters(), *student.buffers())))


def open_saved(student: nn.Module | str | Path, out: str | Path | None, *, shard: bool, method: str,
               overwrite: bool = False) -> tuple[nn.Module, SavedStudent]:
    """The meta-device student and its `SavedStudent`; a one-line `RecoveryError` (or `KroncFileError` for the
    folder's files) before any work when this cannot run: no process group of 2+ ranks, ``shard`` off, block-wise
    reconstruction, no ``out``, an ``out`` that is not free, a model not loaded with ``device="meta"``."""
    if not shard:
        raise RecoveryError("a student given as a save folder (or on the meta device) is recovered sharded: pass shard=True "
                            "(or load it whole with kronc.load and recover it)")
    if method != "distill":
        raise RecoveryError(f"method={method!r} needs the whole student: recovering from a save folder runs "
                            "method='distill' only")
    if not dist.active() or dist.world() < 2:
        raise RecoveryError(f"recovering a save folder shards the student over 2 or more ranks (world size {dist.world()}): "
                            "launch with torchrun --nproc_per_node N (N >= 2), or load it whole with kronc.load")
    if out is None:
        raise RecoveryError("recovering a save folder writes the recovered student to a new save folder: pass out=")
    try:
        SaveWriter.check(out, overwrite=overwrite)
    except FileExistsError as e:
        raise RecoveryError(str(e)) from e
    verify = not isinstance(student, str | Path)  # a folder is checked by load below; a loaded model's files again
    if isinstance(student, str | Path):
        student = load(student, device="meta")
    folder = getattr(student, "kronc_folder", None)
    if folder is None or not all(t.is_meta for t in (*student.parameters(), *student.buffers())):
        raise RecoveryError("the student has tensors on the meta device but was not loaded with kronc.load(folder, "
                            "device='meta'): pass its save folder, or a model loaded that way")
    manifest = read_manifest(folder)
    if Path(out).resolve() == Path(folder).resolve():
        raise RecoveryError(f"out={str(out)!r} is the folder the student is read from: write to another folder")
    return student, SavedStudent(Path(folder), manifest, stored_layout(Path(folder), manifest, verify=verify), Path(out))


def fill(student: nn.Module, saved: SavedStudent) -> None:
    """Fill the sharded, just allocated ``student``: this rank's rows of every parameter, buffers whole, read from the
    save's files; the rest as the module docstring says."""

    aliases = _stored_names(student, saved)
    done: set[int] = set()
    for owner_name, owner in student.named_modules():
        skip = owner._non_persistent_buffers_set
        recompute = [a for a, b in owner._buffers.items() if b is not None and a in skip]
        if recompute:
            recompute_buffers(student, owner, owner_name, recompute, device=_device_of(owner))
        with _files() as open_file:  # closed after each module: the mapped pages it read leave resident memory
            for kind in ("_parameters", "_buffers"):
                for attr, t in getattr(owner, kind).items():
                    if t is not None and id(t) not in done and attr not in skip:
                        done.add(id(t))
                        _fill_tensor(t, attr, aliases.get(id(t)), f"{owner_name}.{attr}".lstrip("."), saved, open_file)


@torch.no_grad()
def _fill_tensor(t: Tensor, attr: str, key: str | None, name: str, saved: SavedStudent, open_file: Any) -> None:
    """Fill one tensor: this rank's rows of a sharded parameter, a plain tensor whole, a trained-scale parameter with
    its starting value (stored under ``key``; None: not stored)."""
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    if key is None:
        if attr not in START:
            raise KroncFileError(f"{saved.folder}: no file holds {name}")
        local.fill_(START[attr])
        return
    file, shape, _ = saved.layout[key]
    if not shape:
        local.copy_(open_file(file).get_tensor(key))
    elif isinstance(t, DTensor):
        start, rows = _my_rows(shape[0], local.shape[0], key)
        if rows:
            local.copy_(open_file(file).get_slice(key)[start:start + rows])
    else:
        local.copy_(open_file(file).get_slice(key)[:])


def _stored_names(student: nn.Module, saved: SavedStudent) -> dict[int, str]:
    """Each tensor of ``student`` (by identity) -> the name it is stored under (tied tensors are stored once)."""
    out: dict[int, str] = {}
    for name, t in student.state_dict(keep_vars=True).items():
        if name in saved.layout:
            out.setdefault(id(t), name)
    return out


def _my_rows(total: int, held: int, key: str) -> tuple[int, int]:
    """First row and row count of this rank's chunk of a ``total``-row parameter: FSDP2 shards dim 0 as
    ``torch.chunk`` does (chunks of ``ceil(total / world)`` rows, the last ones shorter or empty)."""
    chunk = math.ceil(total / dist.world())
    start = min(dist.rank() * chunk, total)
    rows = max(0, min(chunk, total - start))
    if rows != held:
        raise RuntimeError(f"{key}: FSDP2 gave rank {dist.rank()} {held} of {total} rows, not the torch.chunk layout's {rows}")
    return start, rows


def _device_of(module: nn.Module) -> str:
    for t in (*module.parameters(), *module.buffers()):
        return t.device.type
    return "cpu"


@contextlib.contextmanager
def _files() -> Iterator[Any]:
    """A function that opens a safetensors file once (only the slices asked for are read) and closes them all at the end."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def open_file(path: Path) -> Any:
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path]

        yield open_file


def write(student: nn.Module, units: list[nn.Module], saved: SavedStudent) -> Path:
    """Write the sharded ``student`` as a sharded kronc save at ``saved.out``, one unit gathered at a time (a collective:
    every rank calls it); the student is left on the meta device."""
    names = {id(m): n for n, m in student.named_modules()}
    prefixes = [names[id(u)] for u in units]
    pieces: list[tuple[str, list[tuple[str, nn.Module]]]] = [
        (p, list(u.named_modules(prefix=p))) for p, u in zip(prefixes, units, strict=True)]
    inside = tuple(f"{p}." for p in prefixes)
    rest = [(n, m) for n, m in student.named_modules() if n not in prefixes and not n.startswith(inside)]
    pieces.append(("", rest))
    writer = SaveWriter.prepare(saved.out)
    try:
        for index, (_, modules) in enumerate(pieces):
            tensors = _gathered(modules)
            error = None
            if dist.owns(index if index < len(units) else None, len(units)):
                try:
                    writer.write_tensors(index, len(pieces), unshared(dedupe(tensors)))
                except Exception as e:  # noqa: BLE001 - exchanged below, so every rank stops here together
                    error = e
            del tensors
            _to_meta(modules)
            failed = [m for m in dist.gather_list(None if error is None else f"{type(error).__name__}: {error}") if m]
            if error is not None:
                raise error
            if failed:
                raise dist.RankFailed(f"a rank failed writing {saved.out}: {failed[0]}")
        fields = {k: saved.manifest.get(k) for k in ("model_class", "huggingface", "output", "source", "example_inputs",
                                                       "plan", "policy")}
        return writer.publish(fields, saved.folder, copied=("config.json", *COPIED))
    except BaseException:
        writer.abort()
        raise


def _gathered(modules: list[tuple[str, nn.Module]]) -> dict[str, Tensor]:
    """The stored tensors of ``modules`` whole: each sharded parameter gathered (every rank, same order) and put in
    place as a plain parameter, then every quantized tensor's trained scales stored back into its buffers."""
    from torch.distributed.tensor import DTensor

    whole: dict[int, nn.Parameter] = {}  # a tied parameter is gathered once, and stays tied
    for _, m in modules:
        for attr, p in list(m._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in whole:
                    whole[id(p)] = nn.Parameter(p.detach().full_tensor(), requires_grad=False)
                m._parameters[attr] = whole[id(p)]
    for _, m in modules:
        if isinstance(m, QuantizedTensor):
            m.commit_scales()
    out: dict[str, Tensor] = {}
    for name, m in modules:
        prefix = f"{name}." if name else ""
        out.update({prefix + a: p.detach() for a, p in m._parameters.items() if p is not None})
        out.update({prefix + a: b for a, b in m._buffers.items() if b is not None and a not in m._non_persistent_buffers_set})
    return out


def _to_meta(modules: list[tuple[str, nn.Module]]) -> None:
    """Free a written unit: its tensors replaced by meta tensors of the same shapes and dtypes."""
    for _, m in modules:
        for attr, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for attr, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[attr] = torch.empty_like(b, device="meta")
    release_memory()

