"""The model skeleton of a streamed compile: every module on the meta device, weights loaded one unit
(a block, or the rest: embeddings, final norm, head) at a time from the checkpoint's shards.

The skeleton is built from ``config.json`` under ``torch.device("meta")`` (no memory for weights),
traced once on meta inputs (`kronc.capture`: the same sites, tags and order as the in-memory compile
finds), and its blocks are found from the data flow of one meta forward pass
(`kronc.recover.blocks.find_blocks`: the ModuleList of same-class modules that feed one another).
`load_unit` swaps a unit's meta tensors for the stored ones (tied parameters stay tied; buffers the
checkpoint does not hold, such as rotary frequencies, are recomputed by the model's own
``_init_weights``); `unload_unit` puts the meta tensors back, which frees the memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import Captured, capture
from ..recover.blocks import find_blocks
from ..recover.config import RecoveryError
from ..serialize.shards import Checkpoint, CheckpointError


@dataclass
class Skeleton:
    """A meta-device model, its captured sites, its block container and the checkpoint it reads."""

    model: nn.Module
    captured: Captured
    container: str
    """Qualified name of the ModuleList holding the blocks (``model.layers``)."""
    blocks: nn.ModuleList
    checkpoint: Checkpoint
    example: dict[str, Any]

    @property
    def count(self) -> int:
        return len(self.blocks)

    def block_prefix(self, i: int) -> str:
        return f"{self.container}.{i}."

    def unit_of(self, name: str) -> int | None:
        """The block index a qualified name lives in, or None for the rest of the model."""
        prefix = f"{self.container}."
        if not name.startswith(prefix):
            return None
        head = name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < self.count else None


def build(folder: str | Path) -> Skeleton:
    """The skeleton of the Hugging Face model in ``folder``; `CheckpointError` in one line for a folder
    without ``config.json``, a class that cannot be built on the meta device, no block list, or shards
    that are missing or do not match the config."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise CheckpointError(f"{folder} {what}: streamed compile needs a Hugging Face model folder (config.json + safetensors)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"{folder / 'config.json'} cannot be read: {_first_line(e)}") from e
    checkpoint = Checkpoint.open(folder)
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        with torch.device("meta"):
            model = auto.from_config(config, dtype=torch.float32).eval()
    except Exception as e:
        raise CheckpointError(f"cannot build {archs[0] if archs else type(config).__name__} from {folder / 'config.json'} "
                              f"on the meta device: {_first_line(e)}") from e
    expected = {n: tuple(t.shape) for n, t in _stored_tensors(model)}
    checkpoint.check(expected, _aliases(model))
    example = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")}
    try:
        captured = capture(model, example)
    except Exception as e:
        raise CheckpointError(f"cannot trace {type(model).__name__} on the meta device: {_first_line(e)}") from e
    try:
        chain = find_blocks(model, model, (), example)
    except RecoveryError as e:
        raise CheckpointError(f"streamed compile needs a list of blocks: {e}") from e
    if chain.recurrent or isinstance(chain.blocks[0].student, (nn.LSTM,)) or not chain.container:
        raise CheckpointError(f"streamed compile needs a ModuleList of blocks; {type(model).__name__} has none")
    blocks = model.get_submodule(chain.container)
    assert isinstance(blocks, nn.ModuleList | nn.Sequential)
    return Skeleton(model, captured, chain.container, blocks, checkpoint, example)  # type: ignore[arg-type]


def _stored_tensors(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """Parameters and persistent buffers (what a checkpoint holds), each tensor once."""
    seen: set[int] = set()
    for name, t in module.state_dict(prefix=prefix, keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            yield name, t


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every parameter name -> the other names of the same tensor (tied weights)."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {n: [m for m in group if m != n] for group in names.values() for n in group}


def unit_names(skeleton: Skeleton, unit: int | None) -> list[str]:
    """The stored tensor names a unit needs (block ``unit``, or the rest for None)."""
    aliases = _aliases(skeleton.model)
    out = []
    for name, _ in _stored_tensors(skeleton.model):
        if skeleton.unit_of(name) != unit:
            continue
        stored = skeleton.checkpoint.find(name, aliases.get(name, ()))
        assert stored is not None  # checked by `build`
        out.append(stored)
    return out


def load_unit(skeleton: Skeleton, unit: int | None) -> int:
    """Load a unit's tensors from the shards into the skeleton (float32, as the in-memory compile loads);
    return the bytes loaded."""
    model, ckpt = skeleton.model, skeleton.checkpoint
    aliases = _aliases(model)
    root = model if unit is None else skeleton.blocks[unit]
    prefix = "" if unit is None else skeleton.block_prefix(unit)
    wanted: dict[str, str] = {}
    for name, t in _stored_tensors(root, prefix):
        if unit is None and skeleton.unit_of(name) is not None or not t.is_meta:
            continue
        stored = ckpt.find(name, aliases.get(name, ()))
        if stored is None:
            raise CheckpointError(f"no shard in {ckpt.folder} holds {name}")
        wanted[name] = stored
    tensors = ckpt.load(sorted(set(wanted.values())))
    replaced: dict[int, Tensor] = {}
    loaded = 0
    for owner_name, owner in root.named_modules():
        full_owner = prefix + owner_name + ("." if owner_name else "")
        if unit is None and skeleton.unit_of(full_owner) is not None:
            continue
        for kind in ("_parameters", "_buffers"):
            slots: dict[str, Tensor | None] = getattr(owner, kind)
            for attr, slot in list(slots.items()):
                if slot is None or not slot.is_meta:
                    continue
                if id(slot) in replaced:
                    slots[attr] = replaced[id(slot)]
                    continue
                key = wanted.get(full_owner + attr)
                if key is None:
                    continue  # a buffer the checkpoint does not hold: recomputed below
                value = tensors[key].to(slot.dtype)
                new = nn.Parameter(value, requires_grad=slot.requires_grad) if kind == "_parameters" else value
                replaced[id(slot)] = new
                slots[attr] = new
                loaded += value.numel() * value.element_size()
    _init_buffers(skeleton, root, prefix, unit)
    return loaded


def _init_buffers(skeleton: Skeleton, root: nn.Module, prefix: str, unit: int | None) -> None:
    """Buffers still on meta (non-persistent, e.g. rotary frequencies) recomputed by the model's ``_init_weights``,
    only on modules without parameters of their own (so no stored weight is re-initialised)."""
    for owner_name, owner in root.named_modules():
        if unit is None and skeleton.unit_of(prefix + owner_name + ".") is not None:
            continue
        meta = [a for a, b in owner._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        recompute_buffers(skeleton.model, owner, prefix + owner_name, meta)
        still = [a for a, b in owner._buffers.items() if b is not None and b.is_meta]
        if still:
            raise CheckpointError(f"{prefix}{owner_name}: buffers {', '.join(still)} stay uninitialised")


def recompute_buffers(model: nn.Module, owner: nn.Module, name: str, buffers: list[str], device: str = "cpu") -> None:
    """``owner``'s ``buffers`` that no checkpoint stores (rotary frequencies) allocated on ``device`` and recomputed by
    the model's own ``_init_weights``; refused (`CheckpointError`) on a module with parameters of its own, whose
    stored weights the init would overwrite."""
    init = getattr(model, "_init_weights", None)
    if init is None or any(True for _ in owner.parameters(recurse=False)):
        raise CheckpointError(f"{name}: buffers {', '.join(buffers)} are not stored and kronc cannot recompute them")
    owner.to_empty(device=device, recurse=False)
    with torch.no_grad():
        init(owner)


def unload_unit(skeleton: Skeleton, unit: int) -> None:
    """Put block ``unit`` back on the meta device (frees its weights)."""
    skeleton.blocks[unit].to("meta")
    release_memory()


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``): without it, the freed tensors of each
    block stay in the allocator's arenas and resident memory creeps up block after block."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> Any:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def rest_state(skeleton: Skeleton) -> Mapping[str, Tensor]:
    """The state dict of everything outside the blocks (loaded with ``load_unit(skeleton, None)``)."""
    return {k: v for k, v in skeleton.model.state_dict().items() if skeleton.unit_of(k) is None}


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
