"""Module-level application: swap compressed modules into an eager model.

The model keeps its class, its forward code and (for Hugging Face models) ``generate()``; only the
modules that own compressed weights change. Works for every site owned by an ``nn.Linear``,
``Conv1D``, ``nn.Embedding`` or ``nn.LSTM``; weights used through ``F.linear`` need the graph
rewrite (`kronc.passes.rewrite`).
"""

from __future__ import annotations

from torch import nn

from ..formats import Factorized
from ..sites import Site
from .replacements import replacement_for_module


class SwapError(ValueError):
    """A site cannot be compressed by swapping modules."""


def swappable(site: Site) -> bool:
    return site.kind != "functional"


def swap_modules(model: nn.Module, sites: list[Site], weights: dict[str, Factorized]) -> nn.Module:
    """Replace, in ``model`` itself, every module owning a compressed weight; returns ``model``."""
    by_module: dict[str, tuple[str, dict[str, Factorized]]] = {}
    for site in sites:
        if site.name not in weights:
            continue
        if not swappable(site):
            raise SwapError(
                f"site {site.name} is used through F.linear inside {site.owner or 'the root module'}, so no module "
                "can be swapped for it; compress the traced graph instead (kronc.compile(..., output='graph'))"
            )
        fmt = weights[site.name]
        for name in (site.name, *site.aliases):
            owner, _, attr = name.rpartition(".")
            mod = model.get_submodule(owner)
            role = "lstm" if isinstance(mod, nn.LSTM) else "embedding" if isinstance(mod, nn.Embedding) else "linear"
            by_module.setdefault(owner, (role, {}))[1][attr] = fmt
    for owner, (role, fmts) in by_module.items():
        set_submodule(model, owner, replacement_for_module(model.get_submodule(owner), role, fmts))
    return model


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    if not path:
        raise SwapError("cannot replace the root module itself")
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent), name, module)
