"""Cached activations of a streamed compile: in memory, or one file per entry in a folder when offloaded.

Entries are the current stream per calibration batch (replaced block after block) and, for the
sensitivity sweep, every block's stream input on the first batches. Offloading trades memory for disk
reads: at most one entry is in memory at a time besides the block's own work.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


class Activations:
    """A keyed store; ``folder`` None keeps everything in memory."""

    def __init__(self, folder: str | Path | None) -> None:
        self._memory: dict[Any, Any] = {}
        self._dir: Path | None = None
        if folder is not None:
            root = Path(folder)
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OSError(f"cannot create the activation folder {root}: {e.strerror}") from e
            self._dir = Path(tempfile.mkdtemp(prefix="kronc-acts-", dir=root))

    def _file(self, key: Any) -> Path:
        assert self._dir is not None
        name = "_".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        return self._dir / f"{name}.pt"

    def put(self, key: Any, value: Any) -> None:
        if self._dir is None:
            self._memory[key] = value
        else:
            torch.save(value, self._file(key))

    def get(self, key: Any) -> Any:
        if self._dir is None:
            return self._memory[key]
        return torch.load(self._file(key), weights_only=True)

    def drop(self, key: Any) -> None:
        if self._dir is None:
            self._memory.pop(key, None)
        else:
            self._file(key).unlink(missing_ok=True)

    def close(self) -> None:
        self._memory.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
