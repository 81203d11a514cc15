"""Candidate generation: every concrete format spec a site's allowed `Choice`s admit, priced exactly.

Each format's planning family (`kronc.planning.families`) lists the structures a choice allows
(``dense``: the identity; ``lowrank``: ranks; ``kronecker``: factor shapes x term counts; ``doped``:
bases x overlay densities; ``blocksparse``: block shapes x densities); this generic layer prices
them from their spec alone (exact bytes and stored values, indices counted), keeps only those that
store fewer bytes than dense (dense itself only when a rule allows it) and drops duplicates.
Here the second axis, precision (bits per stored value, the choice's ``precisions``), multiplies
the structures: a precision that a tensor of the site cannot take is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..formats import FormatError, FormatSpec, Shape
from .families import Choice, family
from .options import SearchOptions
from .shapes import divisor_pairs, factor_shapes, geometric, itemsize, max_saving_rank, most_balanced

__all__ = [
    "Candidate", "PlanningError", "divisor_pairs", "factor_shapes", "geometric", "max_saving_rank", "most_balanced",
    "site_candidates",
]


class PlanningError(ValueError):
    """A site's allowed formats give the planner nothing to choose from."""


@dataclass(frozen=True)
class Candidate:
    """One concrete format for one site, priced exactly; the estimate and damage come later."""

    spec: FormatSpec
    nbytes: int
    """Stored bytes, values and indices."""
    nparams: int
    """Stored values (indices excluded)."""
    choice: int = 0
    """Index of the `FormatChoice` in the site's space that produced this candidate."""
    error: float | None = None
    """Estimated relative error ``||W - W'|| / ||W||`` (weight or data-aware), see `estimate`."""
    damage: float | None = None
    """What the solver minimises summed over sites (absolute squared error, see `planner`)."""

    def cost(self, key: str) -> int:
        return self.nbytes if key == "bytes" else self.nparams


def site_candidates(
    shape: Shape,
    dtype: torch.dtype | int,
    choices: Sequence[Choice],
    options: SearchOptions | None = None,
) -> list[Candidate]:
    """Every candidate the ``choices`` allow for a weight of ``shape`` whose values are ``dtype``.

    Raises `PlanningError` when the choices leave nothing (e.g. only block shapes that do not divide).
    """
    options = options or SearchOptions()
    shape = (int(shape[0]), int(shape[1]))
    size = itemsize(dtype)
    dense_bytes = shape[0] * shape[1] * size
    seen: dict[FormatSpec, Candidate] = {}

    def add(spec: FormatSpec, index: int, *, always: bool = False) -> None:
        nbytes = spec.nbytes(shape, size)
        if (always or nbytes < dense_bytes) and spec not in seen:
            seen[spec] = Candidate(spec=spec, nbytes=nbytes, nparams=spec.nparams(shape), choice=index)

    skipped: list[str] = []
    for index, choice in enumerate(choices):
        fam = family(choice.kind)
        for structure in fam.structures(shape, choice, options):
            for precision in choice.precision_list():
                spec = structure if precision is None else structure.model_copy(update={"precision": precision})
                if precision is not None:
                    try:
                        spec.check(shape)
                    except FormatError as e:
                        skipped.append(str(e))
                        continue
                add(spec, index, always=spec.identity)
    if not seen:
        kinds = ", ".join(c.kind for c in choices) or "none"
        why = f" (skipped: {skipped[0]})" if skipped else ""
        raise PlanningError(
            f"no candidate format for a {shape[0]}x{shape[1]} weight: the allowed formats ({kinds}) have no "
            f"setting that divides this shape and stores fewer bytes than dense{why}; allow 'dense' or other formats"
        )
    return list(seen.values())
