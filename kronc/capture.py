"""Capture: trace a model into an fx graph and find its compressible weights (sites).

Plain modules go through ``torch.fx.symbolic_trace``; models fx cannot trace (every Hugging Face
transformers v5 model) go through ``torch.export.export(strict=False)``. Either way the result is
a `Captured`: the graph, the ordered sites, and the model they came from. The model is never
modified: the graph shares its parameters, and the passes work on copies.

A site is one weight *tensor*: uses are grouped by parameter identity, so tied weights (an
embedding shared with the LM head) are one site with two uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn

from .sites import (
    ADDMM,
    EMBEDDING_FNS,
    LINEAR_FNS,
    Site,
    SiteKind,
    Use,
    lstm_weight_names,
    module_role,
)

Method = Literal["auto", "fx", "export"]

class CaptureError(RuntimeError):
    """The model could not be traced, or has nothing kronc can compress."""


@dataclass
class Captured:
    """A traced model and its compressible sites."""

    model: nn.Module
    """The model as given (never modified)."""
    graph_module: fx.GraphModule
    """Its graph; shares parameters with ``model``."""
    sites: list[Site]
    method: Literal["fx", "export"]
    example_args: tuple[Any, ...] = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name or name in s.aliases:
                return s
        raise KeyError(f"no site named {name!r}; sites are: {', '.join(s.name for s in self.sites)}")

    def weight(self, site: Site | str) -> Tensor:
        """The site's weight as a logical ``(out, in)`` matrix (Conv1D weights transposed)."""
        site = self.site(site) if isinstance(site, str) else site
        w = self.model.get_parameter(site.name).detach()
        return w.T if site.kind == "conv1d" else w

    def weights(self) -> dict[str, Tensor]:
        return {s.name: self.weight(s) for s in self.sites}

    def table(self) -> str:
        return "\n".join(s.describe() for s in self.sites)


def capture(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | Tensor | Mapping[str, Any] | None = None,
    *,
    method: Method = "auto",
) -> Captured:
    """Trace ``model`` and list its compressible sites in graph order.

    ``example_inputs`` is a tuple of positional inputs, a single tensor, or a dict of keyword
    inputs. It is needed only for ``torch.export`` (fx traces symbolically); Hugging Face models
    fall back to their ``dummy_inputs`` when none are given.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"kronc.capture needs an nn.Module, got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    errors: list[str] = []
    gm: fx.GraphModule | None = None
    used: Literal["fx", "export"] = "fx"
    if isinstance(model, fx.GraphModule) and method != "export":
        gm = model
    elif method in ("auto", "fx"):
        try:
            gm = fx.symbolic_trace(model)
        except Exception as e:  # fx raises many types; we report them all the same way
            errors.append(f"torch.fx.symbolic_trace failed: {type(e).__name__}: {_first_line(e)}")
            if method == "fx":
                raise CaptureError(f"cannot trace {type(model).__name__}: {errors[0]}") from e
    if gm is None:
        args, kwargs = _export_inputs(model, args, kwargs)
        if not args and not kwargs:
            errors.append("torch.export needs example inputs: pass example_inputs=(tensor, ...) or a dict")
            raise CaptureError(f"cannot trace {type(model).__name__}: " + "; ".join(errors))
        try:
            with torch.no_grad():
                gm = torch.export.export(model, args, kwargs=kwargs, strict=False).module()
            used = "export"
        except Exception as e:
            errors.append(f"torch.export.export(strict=False) failed: {type(e).__name__}: {_first_line(e)}")
            raise CaptureError(f"cannot trace {type(model).__name__}: " + "; ".join(errors)) from e
    sites = find_sites(model, gm)
    return Captured(model, gm, sites, used, args, kwargs)


def find_sites(model: nn.Module, gm: fx.GraphModule) -> list[Site]:
    """Every compressible weight used in ``gm``, grouped by tensor identity, in graph order."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    uses: dict[int, list[Use]] = {}
    params: dict[int, nn.Parameter] = {}

    def record(p: object, use: Use) -> None:
        if isinstance(p, nn.Parameter) and id(p) in names and p.dim() == 2:
            uses.setdefault(id(p), []).append(use)
            params[id(p)] = p

    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            role = module_role(mod)
            if role == "lstm" and isinstance(mod, nn.LSTM):
                for attr in lstm_weight_names(mod):
                    record(getattr(mod, attr), Use(node.name, "lstm", node.target))
            elif role is not None:
                record(mod.weight, Use(node.name, role, node.target))
        elif node.op == "call_function":
            found = _function_weight(gm, node)
            if found is not None:
                weight, role = found
                record(weight, Use(node.name, role, _owner_from_meta(node)))

    output_embedding = _hf_output_embedding(model)
    sites = []
    for key, us in uses.items():
        p, all_names = params[key], names[key]
        roles = {u.role for u in us}
        canonical = all_names[0]
        owner, _, attr = canonical.rpartition(".")
        owner_mod = model.get_submodule(owner)
        kind: SiteKind
        tags: set[str] = set()
        if "embedding" in roles:
            kind = "embedding"
            tags.add("embedding")
        elif "lstm" in roles:
            kind = "lstm"
            tags.add("lstm_ih" if attr.startswith("weight_ih") else "lstm_hh")
        elif "conv1d" in roles:
            kind = "conv1d"
        elif isinstance(owner_mod, nn.Linear):
            kind = "linear"
        else:
            kind = "functional"
        if len(all_names) > 1:
            tags.add("tied")
        if (output_embedding is not None and output_embedding is p) or any(
            n.rpartition(".")[0].split(".")[-1] == "lm_head" for n in all_names
        ):
            tags.add("lm_head")
        shape = tuple(p.shape[::-1]) if kind == "conv1d" else tuple(p.shape)
        sites.append(
            Site(
                name=canonical, kind=kind, shape=shape, dtype=p.dtype, owner=owner, attr=attr,  # type: ignore[arg-type]
                uses=tuple(us), aliases=tuple(all_names[1:]), tags=frozenset(tags),
            )
        )
    return sites


def _function_weight(gm: fx.GraphModule, node: fx.Node) -> tuple[Tensor, Literal["linear", "conv1d", "embedding"]] | None:
    def attr(arg: object) -> Tensor | None:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            try:
                return gm.get_parameter(arg.target)  # type: ignore[arg-type]
            except AttributeError:
                return None
        return None

    if node.target in LINEAR_FNS:
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        p = attr(w)
        return None if p is None else (p, "linear")
    if node.target is ADDMM and len(node.args) == 3 and not node.kwargs:
        p = attr(node.args[2])
        return None if p is None else (p, "conv1d")
    if node.target in EMBEDDING_FNS:
        w = node.args[0] if node.target is torch.ops.aten.embedding.default else node.args[1]
        p = attr(w)
        return None if p is None else (p, "embedding")
    return None


def _owner_from_meta(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _cls = list(stack.values())[-1]
    return str(path)


def _hf_output_embedding(model: nn.Module) -> nn.Parameter | None:
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return None
    try:
        head = get()
    except Exception:
        return None
    return getattr(head, "weight", None) if head is not None else None


def _split_inputs(example_inputs: object) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs, got {type(example_inputs).__name__}"
    )


def _export_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Fill in Hugging Face defaults: dummy inputs when none are given, and ``use_cache=False``."""
    if not args and not kwargs:
        dummy = getattr(model, "dummy_inputs", None)
        if isinstance(dummy, Mapping):
            kwargs = {k: v for k, v in dummy.items() if isinstance(v, Tensor)}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs = {**kwargs, "use_cache": False}
    return args, kwargs


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
