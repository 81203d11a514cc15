"""Checkpoints of a recovery run: everything needed to continue it exactly where it was.

A `Snapshot` is the state at the *start* of a step: student tensors, optimizer and schedule,
the RNG states (torch, Python, numpy), every scheme's state, the batch source's position, the
history so far. The loop keeps the last snapshot whose step gave a finite loss in memory (to put
the student back when a loss turns NaN/inf) and writes it to ``checkpoint_path`` when set. Files are
written atomically (a temporary file, then a rename) and read with ``torch.load(weights_only=True)``,
so scheme states must be tensors, numbers, strings, and lists/tuples/dicts of them.

A file holds the serialized snapshot as a byte tensor beside its SHA-256, so a flipped byte is
caught before anything is restored; the fields and their ranges are checked too. A path that
exists and is not a kronc checkpoint is never overwritten (`check_target`).
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import RecoveryConfig, RecoveryError

KIND = "kronc.recover checkpoint"
VERSION = 2
"""2: the snapshot is stored as checksummed bytes (1 had no checksum and is refused)."""
MAY_CHANGE_ON_RESUME = frozenset({"max_seconds", "log_every", "checkpoint_every", "checkpoint_path", "shard"})
"""Recipe fields a resumed run may change; every other field must equal the checkpoint's."""


@dataclass
class Snapshot:
    """The state of a run at the start of ``step`` (copies, not views of the live tensors)."""

    step: int
    student: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    schemes: list[dict[str, Any]]
    batches: dict[str, int]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # numpy's global generator is an MT19937: its legacy state is a tuple
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    """Python's random state is nested tuples; a checkpoint may hand them back as lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def take_snapshot(step: int, student: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                  schemes: list[Any], batches: Any, history: list[dict[str, Any]], seconds: float,
                  tokens: int) -> Snapshot:
    return Snapshot(
        step=step,
        student={k: v.detach().clone() for k, v in student.state_dict().items()},
        optimizer=copy.deepcopy(optimizer.state_dict()),
        scheduler=copy.deepcopy(scheduler.state_dict()),
        rng=rng_state(),
        schemes=[copy.deepcopy(s.state_dict()) for s in schemes],
        batches=dict(batches.state_dict()),
        history=list(history),
        seconds=seconds,
        tokens=tokens,
    )


def restore_model(snap: Snapshot, student: nn.Module, schemes: list[Any]) -> None:
    """Put the student's tensors and the schemes' states back to ``snap``."""
    try:
        student.load_state_dict(snap.student)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise RecoveryError(f"the checkpoint does not fit this student: {' '.join(x.strip() for x in first[:3])}") from None
    for scheme, state in zip(schemes, snap.schemes, strict=True):
        scheme.load_state_dict(copy.deepcopy(state))


def restore_all(snap: Snapshot, student: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                schemes: list[Any], batches: Any) -> None:
    """Everything: model, schemes, optimizer, schedule, batch position and RNG states."""
    restore_model(snap, student, schemes)
    for part, restore, value in (("optimizer", optimizer.load_state_dict, snap.optimizer),
                                 ("scheduler", scheduler.load_state_dict, snap.scheduler),
                                 ("batches", batches.load_state_dict, snap.batches), ("rng", set_rng_state, snap.rng)):
        try:
            restore(value)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise RecoveryError(f"the checkpoint's {part} state does not fit this run: {_first_line(e)}") from None


def check_target(path: str | Path) -> None:
    """Refuse a ``checkpoint_path`` that would overwrite something that is not a kronc checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise RecoveryError(f"checkpoint_path {path} is a folder: name a file inside it")
    if path.exists() and not _is_checkpoint(path):
        raise RecoveryError(f"checkpoint_path {path} exists and is not a kronc.recover checkpoint: refusing to overwrite "
                            "it; choose another checkpoint_path")


def _is_checkpoint(path: Path) -> bool:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - anything unreadable is not one of ours
        return False
    return isinstance(data, dict) and data.get("kind") == KIND


def save(snap: Snapshot, path: str | Path, config: RecoveryConfig, scheme_names: list[str]) -> Path:
    path = Path(path)
    check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"config": config.model_dump(mode="json"), "scheme_names": scheme_names, **snap.__dict__}
    _write(data, path)
    return path


def _write(data: dict[str, Any], path: Path) -> None:
    """The snapshot's bytes and their SHA-256, written to a temporary file renamed into place."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    payload = buffer.getvalue()
    wrapper = {"kind": KIND, "version": VERSION, "step": data.get("step"),  # the step, readable without unpacking
               "sha256": hashlib.sha256(payload).hexdigest(), "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(wrapper, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Any]:
    """The snapshot dict stored in ``path``, after checking kind, version and checksum."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise RecoveryError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise RecoveryError(f"{path} is not a kronc.recover checkpoint")
    if data.get("version") != VERSION:
        raise RecoveryError(f"{path} is checkpoint version {data.get('version')}; this kronc reads version {VERSION}")
    payload, digest = data.get("payload"), data.get("sha256")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or not isinstance(digest, str):
        raise RecoveryError(f"{path} is corrupted: its payload or checksum is missing")
    raw = payload.numpy().tobytes()
    if hashlib.sha256(raw).hexdigest() != digest:
        raise RecoveryError(f"{path} is corrupted: its SHA-256 does not match")
    try:
        inner = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RecoveryError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    if not isinstance(inner, dict):
        raise RecoveryError(f"{path} is corrupted: expected a dict of fields, got {type(inner).__name__}")
    return inner


def load(path: str | Path, config: RecoveryConfig, scheme_names: list[str]) -> Snapshot:
    """Read a checkpoint written by `save` and check that it belongs to this recipe and these schemes."""
    path = Path(path)
    data = _read(path)
    for key in ("config", "scheme_names", *Snapshot.__dataclass_fields__):
        if key not in data:
            raise RecoveryError(f"{path} is corrupted: the field {key!r} is missing")
    try:
        saved = RecoveryConfig.model_validate(data["config"]).model_dump(mode="json")
    except ValueError as e:
        raise RecoveryError(f"{path} is corrupted: its recipe is invalid: {_first_line(e)}") from None
    now = config.model_dump(mode="json")
    changed = [k for k in now if k not in MAY_CHANGE_ON_RESUME and now[k] != saved.get(k)]
    if changed:
        diffs = ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in changed)
        raise RecoveryError(f"{path} was written with a different recipe: {diffs}; resume with the same settings "
                            f"(only {', '.join(sorted(MAY_CHANGE_ON_RESUME))} may change)")
    if not isinstance(data["scheme_names"], (list, tuple)) or list(data["scheme_names"]) != scheme_names:
        raise RecoveryError(f"{path} was written with schemes {data['scheme_names']!r}, not {scheme_names}")
    _check_fields(path, data, config)
    fields = Snapshot.__dataclass_fields__
    return Snapshot(**{k: data[k] for k in fields})


def _check_fields(path: Path, data: dict[str, Any], config: RecoveryConfig) -> None:
    """Types and ranges of a snapshot's fields: a resume must fail here, not deep inside torch."""
    def bad(key: str, why: str) -> RecoveryError:
        return RecoveryError(f"{path} is corrupted: {key} {why}")

    step = data["step"]
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= config.steps:
        raise bad("step", f"is {step!r}, not a whole number from 0 to the recipe's {config.steps} steps")
    for key in ("tokens",):
        if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0:
            raise bad(key, f"is {data[key]!r}, not a count")
    seconds = data["seconds"]
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise bad("seconds", f"is {seconds!r}, not a time")
    for key in ("student", "optimizer", "scheduler", "rng", "batches"):
        if not isinstance(data[key], dict):
            raise bad(key, f"is a {type(data[key]).__name__}, not a dict")
    if not all(isinstance(v, torch.Tensor) for v in data["student"].values()):
        raise bad("student", "holds something that is not a tensor")
    if not {"state", "param_groups"} <= data["optimizer"].keys():
        raise bad("optimizer", "lacks its state or param_groups")
    if not isinstance(data["schemes"], list) or not all(isinstance(v, dict) for v in data["schemes"]):
        raise bad("schemes", "is not a list of scheme states")
    if not isinstance(data["history"], list):
        raise bad("history", "is not a list")
    _check_rng(path, data["rng"])


def _check_rng(path: Path, rng: dict[str, Any]) -> None:
    """Apply each RNG state to a throwaway generator: a bad one fails here with the checkpoint named."""
    try:
        torch.Generator().set_state(rng["torch"])
        random.Random().setstate(_tuples(rng["python"]))
        name, keys, *rest = rng["numpy"]
        np.random.RandomState().set_state((name, keys.numpy().astype(np.uint32), *rest))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise RecoveryError(f"{path} is corrupted: its RNG state is invalid: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
