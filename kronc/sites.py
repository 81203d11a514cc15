"""Sites: the compressible weights of a model, as found in its captured graph."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

SiteKind = Literal["linear", "conv1d", "functional", "embedding", "lstm"]
"""How a weight is used.

* ``linear``: an ``nn.Linear`` (weight stored ``(out, in)``);
* ``conv1d``: a Hugging Face GPT-2 ``Conv1D`` (weight stored ``(in, out)``, so transposed);
* ``functional``: an ``F.linear`` call on a parameter that is not an ``nn.Linear``'s;
* ``embedding``: an ``nn.Embedding`` table ``(num, dim)``; tied to an LM head it is still one site;
* ``lstm``: one input (``weight_ih_l{k}``) or recurrent (``weight_hh_l{k}``) matrix of an ``nn.LSTM``.
"""


@dataclass(frozen=True)
class Use:
    """One place in the graph where a site's weight is read."""

    node: str
    """Name of the graph node (``call_module`` or ``call_function``) that consumes the weight."""
    role: Literal["linear", "conv1d", "embedding", "lstm"]
    """How that node uses it: as a linear map, a transposed (Conv1D) map, a lookup table, an LSTM."""
    module: str | None = None
    """Qualified name of the module that owns the use, when the use is a module call."""


@dataclass(frozen=True)
class Site:
    """One compressible weight matrix (tied weights are one site)."""

    name: str
    """Qualified name of the weight parameter, e.g. ``transformer.h.0.attn.c_attn.weight``."""
    kind: SiteKind
    shape: tuple[int, int]
    """Logical shape: ``(out, in)`` for linear maps (Conv1D weights are transposed to this),
    ``(num_embeddings, dim)`` for embeddings."""
    dtype: torch.dtype
    owner: str
    """Qualified name of the module holding the parameter (``""`` for the root)."""
    attr: str
    """Attribute name of the parameter on its owner (``weight``, ``weight_ih_l0``, ...)."""
    uses: tuple[Use, ...] = ()
    aliases: tuple[str, ...] = ()
    """Other qualified names of the same tensor (tied weights), e.g. ``lm_head.weight``."""
    tags: frozenset[str] = field(default_factory=frozenset)
    """Facts policies can match on: ``lm_head``, ``tied``, ``embedding``, ``lstm_ih``, ``lstm_hh``."""

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Dense bytes of the weight (the budget's unit)."""
        return self.numel * self.itemsize

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(u.node for u in self.uses)

    @property
    def module_name(self) -> str:
        """The site's name without the trailing ``.weight`` (what users usually call the layer)."""
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name

    def describe(self) -> str:
        tied = f" (tied: {', '.join(self.aliases)})" if self.aliases else ""
        return f"{self.name} [{self.kind} {self.shape[0]}x{self.shape[1]} {str(self.dtype).removeprefix('torch.')}]{tied}"


# ---- what makes a weight a site: detected here only (capture, load and the torch.compile backend ask) ----

LINEAR_FNS: tuple[Callable[..., Any], ...] = (
    torch.nn.functional.linear,
    torch._C._nn.linear,
    torch.ops.aten.linear.default,
)
ADDMM = torch.ops.aten.addmm.default
EMBEDDING_FNS: tuple[Callable[..., Any], ...] = (torch.nn.functional.embedding, torch.ops.aten.embedding.default)
"""Calls that apply a weight as a linear layer (traced by fx or export), addmm (``x @ W.T + b``) and embedding lookups."""


def module_role(mod: nn.Module) -> Literal["linear", "conv1d", "embedding", "lstm"] | None:
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if isinstance(mod, nn.LSTM):
        return "lstm"
    if is_hf_conv1d(mod):
        return "conv1d"
    return None


def is_hf_conv1d(mod: nn.Module) -> bool:
    """Hugging Face GPT-2's ``Conv1D``: a linear layer whose weight is stored ``(in, out)``."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None


def lstm_weight_names(lstm: nn.LSTM) -> list[str]:
    return [f"weight_{kind}_l{k}" for k in range(lstm.num_layers) for kind in ("ih", "hh")]


def logical_shape(param: torch.Tensor, kind: str) -> tuple[int, int]:
    """A weight's logical ``(out, in)`` shape (HF ``Conv1D`` stores it transposed)."""
    return (int(param.shape[1]), int(param.shape[0])) if kind == "conv1d" else (int(param.shape[0]), int(param.shape[1]))


def site_of_parameter(model: nn.Module, name: str) -> Site:
    """The site a module-held weight is, found from the model alone (no tracing): how `kronc.load` finds
    a saved plan's sites. `ValueError` when ``name`` is not a Linear/Conv1D/Embedding/LSTM weight."""
    try:
        param = model.get_parameter(name)
    except AttributeError as e:
        raise ValueError(f"the plan names {name}, which this {type(model).__name__} does not have") from e
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is param]
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner)
    kind = module_role(mod)
    if kind is None:
        raise ValueError(f"site {name} belongs to a {type(mod).__name__}, not a Linear/Conv1D/Embedding/LSTM: a module-mode "
                         "save cannot hold it")
    return Site(name=names[0], kind=kind, shape=logical_shape(param, kind), dtype=param.dtype, owner=owner, attr=attr,
                aliases=tuple(n for n in names if n != names[0]))
