"""Training schemes for `kronc.recover`: the seed papers' training-time techniques as loop plug-ins.

Each scheme implements the hooks of `Scheme` (see `base.py` for the order the loop calls them in)
and also works with a hand-written training loop that calls the same hooks.

* `OverlayAnnealing` (+ `denser_plan`): doped overlays annealed from a denser start to the target
  density, then repacked (doped Kronecker).
* `CoMatrixDropout`: co-matrix dropout regularisation (CMR) of the doped overlay's output.
* `ReweightedGroupLasso`, `prune_blocks`, `BlockMask`: block-structured pruning of dense linears,
  with masked fine-tuning and a lossless bridge to the `blocksparse` format.
* `MovementScores`, `movement_prune`, `MovementPruning`: first-order movement pruning.
* `sparsity_aware_svd`, `mixed_ranks`, `lpaf_factorize`: low-rank prune-and-factorize (LPAF).
"""

from __future__ import annotations

from .anneal import OverlayAnnealing, denser_plan
from .base import Scheme
from .cmr import CoMatrixDropout
from .group_lasso import BlockMask, ReweightedGroupLasso, block_norms, prune_blocks
from .lpaf import energy_rank, lpaf_factorize, masked_error, mixed_ranks, sparsity_aware_svd
from .movement import MovementPruning, MovementScores, cubic_density, movement_prune

__all__ = [
    "BlockMask", "CoMatrixDropout", "MovementPruning", "MovementScores", "OverlayAnnealing", "ReweightedGroupLasso",
    "Scheme", "block_norms", "cubic_density", "denser_plan", "energy_rank", "lpaf_factorize", "masked_error",
    "mixed_ranks", "movement_prune", "prune_blocks", "sparsity_aware_svd",
]
