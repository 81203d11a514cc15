"""Checkpoints of a recovery run: everything needed to continue it exactly where it was.

A `Snapshot` is the state at the *start* of a step: student tensors, optimizer and schedule,
the RNG states (torch, Python, numpy), every scheme's state, the batch source's position, the
history so far. The loop keeps the last snapshot whose step gave a finite loss in memory (to put
the student back when a loss turns NaN/inf) and writes it to ``checkpoint_path`` when set. Files are
written atomically (a temporary file, then a rename) and read with ``torch.load(weights_only=True)``,
so scheme states must be tensors, numbers, strings, and lists/tuples/dicts of them.
"""

from __future__ import annotations

import copy
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
VERSION = 1
MAY_CHANGE_ON_RESUME = frozenset({"max_seconds", "log_every", "checkpoint_every", "checkpoint_path"})
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
    np_state = np.random.get_state()
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
    optimizer.load_state_dict(snap.optimizer)
    scheduler.load_state_dict(snap.scheduler)
    batches.load_state_dict(snap.batches)
    set_rng_state(snap.rng)


def save(snap: Snapshot, path: str | Path, config: RecoveryConfig, scheme_names: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"kind": KIND, "version": VERSION, "config": config.model_dump(mode="json"), "scheme_names": scheme_names,
            **snap.__dict__}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path, config: RecoveryConfig, scheme_names: list[str]) -> Snapshot:
    """Read a checkpoint written by `save` and check that it belongs to this recipe and these schemes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise RecoveryError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise RecoveryError(f"{path} is not a kronc.recover checkpoint")
    if data.get("version") != VERSION:
        raise RecoveryError(f"{path} is checkpoint version {data.get('version')}; this kronc reads version {VERSION}")
    saved = RecoveryConfig.model_validate(data["config"]).model_dump(mode="json")
    now = config.model_dump(mode="json")
    changed = [k for k in now if k not in MAY_CHANGE_ON_RESUME and now[k] != saved.get(k)]
    if changed:
        diffs = ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in changed)
        raise RecoveryError(f"{path} was written with a different recipe: {diffs}; resume with the same settings "
                            f"(only {', '.join(sorted(MAY_CHANGE_ON_RESUME))} may change)")
    if list(data["scheme_names"]) != scheme_names:
        raise RecoveryError(f"{path} was written with schemes {list(data['scheme_names'])}, not {scheme_names}")
    fields = Snapshot.__dataclass_fields__
    return Snapshot(**{k: data[k] for k in fields})
