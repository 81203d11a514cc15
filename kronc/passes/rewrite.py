"""Graph rewrite: replace every use of a compressed site in an fx graph by its compressed subgraph.

Rules, one per way a weight can be used (pattern -> replacement):

* ``call_module`` on a Linear / Conv1D / Embedding / LSTM -> the same node calling the compressed
  module (`kronc.modules`) installed at that path;
* ``linear(x, W, b)`` (``F.linear`` or ``aten.linear``) -> ``call_module[CompressedLinear(W', b)](x)``;
* ``addmm(b, x, W)`` with ``W`` a stored ``(in, out)`` weight (HF Conv1D after export) -> the same;
* ``embedding(W, idx)`` -> ``call_module[CompressedEmbedding(W')](idx)``.

A bias that is computed rather than stored stays in the graph as an add after the new node.
Afterwards the dead ``get_attr`` nodes and the dense weights they read are removed, so the graph
module no longer holds them. `compress_sites` mutates the graph module it is given: pass a copy.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..formats import Factorized
from ..modules import CompressedEmbedding, CompressedLinear
from ..sites import ADDMM, EMBEDDING_FNS, LINEAR_FNS, Site
from .replacements import replacement_for_module
from .swap import set_submodule


def compress_sites(gm: fx.GraphModule, sites: list[Site], weights: dict[str, Factorized]) -> fx.GraphModule:
    """Replace the uses of every site in ``weights`` by its compressed module, in ``gm`` (returned)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    module_weights: dict[str, tuple[str, dict[str, Factorized]]] = {}
    dead: set[str] = set()
    for site in sites:
        fmt = weights.get(site.name)
        if fmt is None:
            continue
        for i, use in enumerate(site.uses):
            node = nodes[use.node]
            if node.op == "call_module":
                attr = site.attr if use.role == "lstm" else "weight"
                module_weights.setdefault(str(node.target), (use.role, {}))[1][attr] = fmt
            else:
                name = _unique_name(gm, f"kronc_{site.module_name.replace('.', '_')}_{i}")
                _rewrite_call(gm, node, fmt, name)
        dead.update((site.name, *site.aliases))
    for target, (role, fmts) in module_weights.items():
        set_submodule(gm, target, replacement_for_module(gm.get_submodule(target), role, fmts))
    _drop_dead_weights(gm, dead)
    gm.graph.lint()
    gm.recompile()
    return gm


def _rewrite_call(gm: fx.GraphModule, node: fx.Node, fmt: Factorized, name: str) -> None:
    graph = gm.graph
    bias_node: fx.Node | None = None
    if node.target in LINEAR_FNS:
        x = node.args[0]
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        stored_bias = _stored(gm, bias_arg)
        module: nn.Module = CompressedLinear(fmt, stored_bias)
        if stored_bias is None and isinstance(bias_arg, fx.Node):
            bias_node = bias_arg
    elif node.target is ADDMM:
        bias_arg, x = node.args[0], node.args[1]
        stored_bias = _stored(gm, bias_arg)
        module = CompressedLinear(fmt, stored_bias)
        if stored_bias is None:
            bias_node = bias_arg  # type: ignore[assignment]
    elif node.target in EMBEDDING_FNS:
        if node.target is torch.ops.aten.embedding.default:
            x, padding = node.args[1], (node.args[2] if len(node.args) > 2 else -1)
        else:
            x, padding = node.args[0], node.kwargs.get("padding_idx")
        module = CompressedEmbedding(fmt, None if padding in (None, -1) else int(padding))  # type: ignore[arg-type]
    else:  # pragma: no cover - capture only records the targets above
        raise ValueError(f"kronc cannot rewrite node {node.name} calling {node.target}")
    gm.add_submodule(name, module)
    with graph.inserting_before(node):
        new: fx.Node = graph.call_module(name, (x,))
        if bias_node is not None:
            new = graph.call_function(operator.add, (new, bias_node))
    new.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")}
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _stored(gm: fx.GraphModule, arg: object) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return _get_attr(gm, str(arg.target))
    return None


def _get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)


def _drop_dead_weights(gm: fx.GraphModule, names: set[str]) -> None:
    """Erase unused ``get_attr`` nodes and delete the dense weights of compressed sites."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    still_read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in names - still_read:
        owner, _, attr = name.rpartition(".")
        try:
            mod = gm.get_submodule(owner)
        except AttributeError:
            continue
        if attr in mod._parameters or attr in mod._buffers:
            delattr(mod, attr)


def _unique_name(gm: fx.GraphModule, base: str) -> str:
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    return name
