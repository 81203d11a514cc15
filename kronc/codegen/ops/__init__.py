"""The ``kronc::`` custom ops, one per format's compute; importing this package registers them.

=============================  ==========================================================
``kron_linear``                ``x @ (Σ_r A_r ⊗ B_r).T + bias``
``doped_kron_linear``          ``x @ (Σ_r A_r ⊗ B_r + S).T + bias``, ``S`` sparse entries
``sparse_linear``              ``x @ S.T + bias`` (doped with a low-rank base or none)
``lowrank_linear``             ``x @ (U V).T + bias``
``blocksparse_linear``         ``x @ W.T + bias``, ``W`` given by its stored blocks only
``kron_embedding``             rows of ``Σ_r A_r ⊗ B_r`` (one row of A and one of B each)
``quant_linear``               ``x @ dequant(W).T + bias``, ``W`` packed by `kronc.values`
=============================  ==========================================================

Each op checks its inputs (`OpInputError` names the op and the shapes), has a fake implementation
for ``torch.compile``/``torch.export``, a torch implementation (the format's reference math, never
the dense weight), a Triton kernel on CUDA (see `kronc.codegen.backend`) and an explicit autograd
formula.
"""

from __future__ import annotations

from ..checks.common import OpInputError
from .blocksparse import blocksparse_linear
from .doped import doped_kron_linear
from .kron import kron_embedding, kron_linear
from .lowrank import lowrank_linear
from .quant import quant_linear
from .sparse import sparse_linear

__all__ = [
    "OpInputError", "blocksparse_linear", "doped_kron_linear", "kron_embedding", "kron_linear",
    "lowrank_linear", "quant_linear", "sparse_linear",
]
