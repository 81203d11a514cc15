"""Per-block checkpoints of block-wise reconstruction: the student's tensors and the finished blocks' records,
written atomically after every block; a resumed run must use the same recipe (the cache, time and
end-to-end settings may change)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .block_fit import BlockRecord
from .checkpoint import MAY_CHANGE_ON_RESUME
from .config import RecoveryConfig, RecoveryError

KIND = "kronc.recover blockwise checkpoint"
VERSION = 1


def save_blocks(cfg: RecoveryConfig, student: nn.Module, records: list[BlockRecord]) -> None:
    assert cfg.checkpoint_path is not None
    path = Path(cfg.checkpoint_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"kind": KIND, "version": VERSION, "config": cfg.model_dump(mode="json"),
            "student": {k: v.detach().clone() for k, v in student.state_dict().items()},
            "records": [r.__dict__ for r in records]}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


def load_blocks(resume: bool | str | Path, cfg: RecoveryConfig, blocks: int) -> dict[str, Any] | None:
    """The checkpoint to continue from: ``checkpoint_path`` (resume=True; None when not written yet) or a file."""
    if resume is True:
        if cfg.checkpoint_path is None:
            raise RecoveryError("resume=True needs checkpoint_path (or pass the checkpoint file as resume=PATH)")
        if not Path(cfg.checkpoint_path).is_file():
            return None
        path = Path(cfg.checkpoint_path)
    else:
        path = Path(resume)  # type: ignore[arg-type]
        if not path.is_file():
            raise RecoveryError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise RecoveryError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(data, dict) or data.get("kind") != KIND or data.get("version") != VERSION:
        raise RecoveryError(f"{path} is not a kronc.recover block-wise checkpoint (version {VERSION})")
    saved = RecoveryConfig.model_validate(data["config"]).model_dump(mode="json")
    now = cfg.model_dump(mode="json")
    may_change = MAY_CHANGE_ON_RESUME | {"blockwise"}
    changed = [k for k in now if k not in may_change and now[k] != saved.get(k)]
    changed += [f"blockwise.{k}" for k in now["blockwise"] if not k.startswith(("cache", "max_", "e2e"))
                and now["blockwise"][k] != saved["blockwise"].get(k)]
    if changed:
        raise RecoveryError(f"{path} was written with a different recipe ({', '.join(changed)} differ): resume with "
                            "the same settings")
    if len(data["records"]) > blocks:
        raise RecoveryError(f"{path} has {len(data['records'])} finished blocks but the student has {blocks}")
    return data

