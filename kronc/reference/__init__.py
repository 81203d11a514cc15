"""Reference math: every format's product and lookup in plain torch, never building the dense weight.

The bottom layer: no torch.library, no kronc imports. The ``kronc::`` ops' torch implementations
call these, the formats' docstrings describe them and the tests compare kernels against them.
"""

from __future__ import annotations

from .blocksparse import blocksparse_apply
from .kronecker import (
    b_first,
    contraction_costs,
    kron_times,
    kronecker_apply,
    kronecker_rows,
    rearrange,
    unrearrange,
)
from .lowrank import lowrank_apply
from .sparse import gather_row_entries, overlay_apply

__all__ = [
    "b_first", "blocksparse_apply", "contraction_costs", "gather_row_entries", "kron_times", "kronecker_apply",
    "kronecker_rows", "lowrank_apply", "overlay_apply", "rearrange", "unrearrange",
]
