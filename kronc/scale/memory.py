"""The memory a streamed compile needs, estimated before it starts, and ``--max-memory``.

Peak resident memory is about: what the process holds already (interpreter, libraries, the meta
skeleton and its traced graph: read from ``/proc``), the rest of the model (embeddings, final norm, head: held throughout,
the embeddings run on every call), one block's weights twice (dense and its compressed copy in the
fitting pass), the block's input statistics (each site's ``(in, in)`` moments in float64, with their
running sums and the two half-sample folds: about ``32 * in^2`` bytes per site), the cached
activations (one stream tensor per calibration batch, in and out), the stream inputs of every block
for the sensitivity batches (kept for the backward sweep unless offloaded), the work inside one block
(attention scores and MLP intermediates of one batch, or the logits over the vocabulary, three times
over when gradients are taken),
the decompositions the analysis runs at once (per worker thread about six ``(in, in)`` float64
matrices of the widest site with calibration, three copies of a block's weights without), and the
error curves (small). Each term is computed from the config and the checkpoint's headers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..inputs import InputError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}

PROCESS = "process so far"
"""The resident memory when the estimate is made: interpreter, libraries, the meta skeleton and its traced graph."""

HINTS = {
    "rest of the model": "the embeddings and head stay loaded: give more memory",
    "one block (x2)": "blocks are this large: give more memory",
    "block statistics": "compress without calibration (weight objective) or give more memory",
    "activations": "use fewer or shorter calibration batches, or --offload-activations DIR",
    "sensitivity cache": "use --offload-activations DIR, fewer solver.sensitivity_batches, or solver.sensitivity: none",
    "work inside a block": "use shorter calibration batches (fewer rows per batch)",
    "analysis workspace": "analyse fewer sites at once (SearchOptions.workers)",
    "error curves": "allow fewer formats in the policy",
}


def parse_memory(text: str | int | float) -> int:
    """``"2GB"``, ``"512MiB"``, ``"1.5 GB"`` or a byte count."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise InputError(f"max memory must be positive, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", str(text).lower())
    if not m:
        raise InputError(f"max memory {text!r} is not a size such as 2GB, 512MiB or 1500000000")
    value = float(m.group(1)) * _UNITS[m.group(2) or "b"]
    if value <= 0:
        raise InputError(f"max memory must be positive, got {text!r}")
    return int(value)


def resident() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 where unavailable)."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])  # noqa: SIM115 - one read
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def human(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass
class Estimate:
    """Bytes per part of the peak (see the module docstring)."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        inner = " + ".join(f"{k} {human(v)}" for k, v in self.parts.items() if v)
        return f"kronc stream: estimated peak memory {human(self.total)} = {inner}"

    def check(self, limit: int | None) -> None:
        """`InputError` naming the largest part that can be lowered (and how) when the estimate exceeds ``limit``."""
        if limit is None or self.total <= limit:
            return
        part, size = max(((k, v) for k, v in self.parts.items() if k != PROCESS), key=lambda kv: kv[1])
        raise InputError(f"the estimated peak memory {human(self.total)} exceeds the maximum {human(limit)}; the largest "
                         f"part is {part} ({human(size)}): {HINTS[part]}")


def estimate(*, rest: int, block: int, stats: int, stream_rows: list[int], width: int, sensitivity_rows: int,
             blocks: int, offload: bool, work: int, analysis: int, curves: int) -> Estimate:
    """The estimate from sizes computed by the caller (rows = tokens per calibration batch)."""
    acts = sum(stream_rows) * width * 4 * 2
    if offload and stream_rows:
        acts = max(stream_rows) * width * 4 * 2
    fisher = 0 if offload else sensitivity_rows * width * 4 * blocks
    return Estimate({
        PROCESS: resident(), "rest of the model": rest, "one block (x2)": 2 * block, "block statistics": stats, "activations": acts,
        "sensitivity cache": fisher, "work inside a block": work, "analysis workspace": analysis, "error curves": curves,
    })
