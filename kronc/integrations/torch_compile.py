"""``torch.compile(model, backend="kronc", options={...})``: compress the captured graph, then compile it.

Registered as the dynamo backend ``"kronc"`` by ``kronc.register_backend()`` (idempotent) or, for an
installed kronc, on first use through the ``torch_dynamo_backends`` entry point; ``import kronc``
registers nothing with dynamo. For each graph dynamo captures, the backend

1. **finds the graph's compressible weights.** Dynamo passes an ``nn.Module``'s parameters to the
   graph as inputs (placeholders named like ``L_self_modules_fc_parameters_weight_``); the backend
   recovers each one's qualified name (``fc.weight``) from dynamo's record of where the input came
   from, so policy rules match the same names as with `kronc.compile`. The weights it sees are
   those read by ``F.linear`` (``nn.Linear``), ``torch.addmm`` (Hugging Face ``Conv1D``) and
   ``F.embedding`` (``nn.Embedding``); sites are found by `kronc.capture.find_sites`.
2. **plans** with the policy from the options (`kronc.plan`, weight objective);
3. **fits and rewrites**: the chosen formats are fitted from the current weights and every use is
   replaced by a `kronc.CompressedLinear` / `kronc.CompressedEmbedding` call stored on the graph
   module (`kronc.passes.rewrite.compress_sites`, so the ``kronc::`` ops appear in the graph, and a
   stored bias goes into the op);
4. **hands the graph on** to inductor (``compile_fx``, with ``mode``'s settings) or to
   ``options["inner"]``.

Options (``torch.compile(..., options={...})``):

* ``budget``: ``"4x"``, ``"40MB"``, ... (overrides the policy's budget);
* ``policy``: a `kronc.Policy`, a policy file or a shipped policy name (``"edge-25x"``);
  at least one of ``budget`` and ``policy`` is needed;
* ``inner``: the backend that compiles the compressed graph: ``"inductor"`` (default), any
  registered backend name (``"eager"``, ``"aot_eager"``) or a backend callable;
* ``inductor``: a dict of inductor config patches (with ``inner="inductor"``);
* ``on_plan``: a callable that receives each graph's `kronc.Plan` (to log or check it);
* ``verify``: run the graph on the example inputs before and after the rewrite and check that
  the outputs keep their structure, shapes and dtypes (`kronc.passes.verify`);
* ``progress``: progress bars while planning and fitting.

Limits:

* **The budget applies to each captured graph separately.** With graph breaks, every piece is
  planned on its own (each meets the budget over its own sites); a piece without compressible
  weights is passed on unchanged. ``fullgraph=True`` makes one graph, one plan.
* **Compute, not memory.** The dense weights stay in the model, which owns them (and dynamo still
  passes them to the compiled graph, which ignores them). For a model that is smaller in memory
  and on disk, and whose plan and quality can be inspected, compress first and compile the result:
  ``torch.compile(kronc.compile(model, budget="4x"), fullgraph=True)``.
* **Inference.** Weights are read once, when a graph is compiled: later changes to the model's
  weights are not seen, and the compressed factors do not require gradients.
* Only the weight objective (no calibration data reaches a backend): a policy with
  ``objective: data`` is planned on weight error. LSTMs are not compressed: dynamo does not trace
  ``nn.LSTM`` (a graph break), so their weights never reach a graph; compress them with
  `kronc.compile`, whose ``CompressedLSTM`` compiles into one graph.
* Recompiles (new shapes, failed guards) plan again; the plan and fitted factors are cached per
  (policy, weights), so a recompile of an unchanged model reuses them (`clear_cache` frees them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch._dynamo.backends.registry import list_backends, register_backend

from ..api import PolicyLike, make_policy
from ..api import plan as make_plan
from ..capture import Captured, find_sites
from ..formats import Factorized
from ..formats.sparse_index import SparseIndex
from ..modules import CompressedEmbedding, CompressedLinear
from ..pipeline import materialize
from ..plan import Plan
from ..planning import fit_site
from ..policies import Policy, resolve
from ..sites import ADDMM, EMBEDDING_FNS, LINEAR_FNS, Site

__all__ = ["BACKEND_NAME", "OPTIONS", "clear_cache", "compress_graph", "kronc_backend", "qualified_name", "register"]

BACKEND_NAME = "kronc"
OPTIONS = ("budget", "policy", "inner", "inductor", "on_plan", "verify", "progress")
"""The keys ``options`` may hold."""

log = logging.getLogger(__name__)

_LIFTED_PREFIX = "_kronc_lifted_"
_INTERNAL = {"_modules", "_parameters", "_buffers"}
_ROOT = re.compile(r"\s*([LG])\[\s*['\"]([^'\"]*)['\"]\s*\]")
_TOKEN = re.compile(r"\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]|\[\s*(\d+)\s*\]|\.(\w+)")


def qualified_name(source: str) -> str | None:
    """The module path in a dynamo source name: ``L['self']._modules['fc']._parameters['weight']`` ->
    ``fc.weight``; ``L['self'].model.layers.0.mlp`` -> ``model.layers.0.mlp``. ``None`` if unreadable.

    ``L['args'][0]`` counts as the model too: when the compiled frame is a wrapper around ``forward``
    taking ``*args`` (transformers 5.24 decorates Llama's), the module reaches dynamo as ``args[0]``.
    """
    root = _ROOT.match(source)
    if root is None:
        return None
    local = root.group(1) == "L"
    parts = [] if local and root.group(2) == "self" else [root.group(2)]
    pos = root.end()
    if local and root.group(2) == "args" and (first := _TOKEN.match(source, pos)) and first.group(3) == "0":
        parts, pos = [], first.end()
    while pos < len(source):
        tok = _TOKEN.match(source, pos)
        if tok is None:
            return None
        piece = next(g for g in tok.groups() if g is not None)
        if piece not in _INTERNAL:
            parts.append(piece)
        pos = tok.end()
    return ".".join(parts) or None


# --------------------------------------------------------------------------------------------------
# finding the parameters of a dynamo graph


@dataclasses.dataclass
class _Lifted:
    """A parameter of the graph, read through a ``get_attr`` node while the graph is rewritten."""

    param: nn.Parameter
    attr: str
    """Attribute of the graph module the ``get_attr`` node reads."""
    names: list[str]
    """Qualified names in the model (the first is canonical; more for tied weights)."""
    placeholder: fx.Node | None
    """The graph input it came from (``None``: dynamo stored it on the graph module itself)."""


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name
    name = name() if callable(name) else name
    return qualified_name(str(name))


def _lift_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[_Lifted]:
    """Make every parameter the graph reads a ``get_attr`` node (what `find_sites` looks for)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first_op = next((n for n in graph.nodes if n.op != "placeholder"), None)
    lifted: list[_Lifted] = []
    taken: set[str] = set()

    def name_for(qualified: str | None, fallback: str) -> str:
        name = qualified if qualified and qualified not in taken else fallback
        taken.add(name)
        return name

    for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=False)):
        if not isinstance(value, nn.Parameter) or not node.users:
            continue
        attr = f"{_LIFTED_PREFIX}{i}"
        gm.register_parameter(attr, value)
        with graph.inserting_before(first_op):
            get = graph.get_attr(attr)
        get.meta = dict(node.meta)
        node.replace_all_uses_with(get)
        lifted.append(_Lifted(value, attr, [name_for(_source_name(node), str(node.target))], node))
    fqns: Mapping[str, str] = gm.meta.get("dynamo_flat_name_to_original_fqn", {})
    for node in graph.nodes:  # parameters dynamo left on the graph module (not inlined modules)
        if node.op != "get_attr" or str(node.target).startswith(_LIFTED_PREFIX):
            continue
        try:
            p = gm.get_parameter(str(node.target))
        except AttributeError:
            continue
        if all(x.param is not p for x in lifted):
            lifted.append(_Lifted(p, str(node.target), [name_for(fqns.get(str(node.target)), str(node.target))], None))
    return lifted


def _weight_arg(node: fx.Node) -> object:
    if node.target in LINEAR_FNS:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if node.target in (ADDMM, torch.addmm):
        return node.args[2] if len(node.args) > 2 else None
    if node.target in EMBEDDING_FNS:
        return node.args[0] if node.target is torch.ops.aten.embedding.default else node.args[1]
    return None


def _module_of(node: fx.Node) -> tuple[str, type] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    name = qualified_name(str(path))
    return (name, cls) if name and isinstance(cls, type) else None


def _is_weight_owner(cls: type) -> bool:
    return issubclass(cls, (nn.Linear, nn.Embedding)) or cls.__name__ == "Conv1D"


def _prepare_uses(gm: fx.GraphModule, lifted: list[_Lifted]) -> set[str]:
    """Name tied uses (aliases), and make ``torch.addmm`` on a weight the ``aten.addmm`` `find_sites`
    reads as a Conv1D. Returns the names of the addmm nodes changed (to undo where not compressed)."""
    by_attr = {x.attr: x for x in lifted}
    changed: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        w = _weight_arg(node)
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target) in by_attr):
            continue
        entry = by_attr[str(w.target)]
        if node.target is torch.addmm and len(node.args) == 3 and not node.kwargs:
            node.target = ADDMM
            changed.add(node.name)
        owner = _module_of(node)
        if owner is not None and _is_weight_owner(owner[1]):
            alias = f"{owner[0]}.weight"
            if alias not in entry.names and all(alias not in x.names for x in lifted):
                entry.names.append(alias)
    return changed


def _holder(lifted: list[_Lifted]) -> nn.Module:
    """A module holding the graph's parameters at their qualified names (for sites and policies)."""
    root = nn.Module()
    for entry in lifted:
        kept = []
        for name in entry.names:
            owner, _, attr = name.rpartition(".")
            mod = root
            try:
                for part in owner.split(".") if owner else []:
                    if part not in mod._modules:
                        mod.add_module(part, nn.Module())
                    mod = mod._modules[part]  # type: ignore[assignment]
                mod.register_parameter(attr, entry.param)
                kept.append(name)
            except (KeyError, AttributeError, TypeError):
                continue  # a name that cannot be a module path: skip it
        if not kept:
            root.register_parameter(entry.attr, entry.param)
            kept.append(entry.attr)
        entry.names = kept
    return root


def _refine(site: Site, gm: fx.GraphModule) -> Site | None:
    """Site kinds from the modules dynamo recorded (an ``F.linear`` inside ``nn.Linear`` is ``linear``);
    ``None`` for an embedding with ``max_norm`` (its lookup rescales rows, which no format does)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    uses = []
    for use in site.uses:
        node = nodes[use.node]
        if use.role == "embedding":
            max_norm = node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")
            if max_norm is not None:
                return None
        owner = _module_of(node)
        uses.append(dataclasses.replace(use, module=owner[0] if owner else None))
    kind = site.kind
    if kind == "functional":
        owners = [_module_of(nodes[u.node]) for u in site.uses]
        if owners and all(o is not None and issubclass(o[1], nn.Linear) for o in owners):
            kind = "linear"
    return dataclasses.replace(site, kind=kind, uses=tuple(uses))


def _restore(gm: fx.GraphModule, lifted: list[_Lifted], addmm: set[str]) -> None:
    """Undo the lifting: remaining uses read the graph inputs again; drop our attributes."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.name in addmm and node.target is ADDMM:
            node.target = torch.addmm
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for entry in lifted:
        if entry.placeholder is None:
            if entry.attr not in read:
                owner, _, attr = entry.attr.rpartition(".")
                mod = gm.get_submodule(owner)
                if attr in mod._parameters:
                    delattr(mod, attr)
            continue
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and node.target == entry.attr:
                node.replace_all_uses_with(entry.placeholder)
                gm.graph.erase_node(node)
        delattr(gm, entry.attr)


# --------------------------------------------------------------------------------------------------
# planning and fitting, cached across recompiles

_CacheKey = tuple[str, tuple[tuple[str, tuple[int, int], int, int], ...]]
_CACHE: OrderedDict[_CacheKey, tuple[Plan, dict[str, Factorized], list[weakref.ref[Tensor]]]] = OrderedDict()
_CACHE_SIZE = 8


def clear_cache() -> None:
    """Forget the plans and fitted factors kept for recompiles (the last 8 (policy, weights) pairs)."""
    _CACHE.clear()


def _plan_and_fit(captured: Captured, policy: Policy, progress: bool) -> tuple[Plan, dict[str, Factorized]]:
    params = [captured.model.get_parameter(s.name) for s in captured.sites]
    key: _CacheKey = (
        policy.model_dump_json(),
        tuple((s.name, s.shape, id(p), p._version) for s, p in zip(captured.sites, params, strict=True)),
    )
    hit = _CACHE.get(key)
    if hit is not None and all(r() is p for r, p in zip(hit[2], params, strict=True)):
        _CACHE.move_to_end(key)
        return hit[0], hit[1]
    the_plan = make_plan(captured, policy, progress=progress)
    weights: dict[str, Factorized] = {}
    with torch.no_grad():
        for d in the_plan.decisions:
            if not d.spec.identity:
                fmt = fit_site(captured.weight(d.site), d.spec)
                weights[d.site] = fmt.requires_grad_(False)
    _CACHE[key] = (the_plan, weights, [weakref.ref(p) for p in params])
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return the_plan, weights


def compress_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    policy: PolicyLike | None = None,
    *,
    budget: str | float | None = None,
    verify: bool = False,
    progress: bool = False,
) -> tuple[fx.GraphModule, Plan | None]:
    """Compress the weights a dynamo graph reads, in place; returns the graph and its plan.

    The plan is ``None`` (and the graph unchanged) when the graph reads no in-scope weight. The
    graph keeps its inputs (compressed weights' inputs become unused), so it can be called as before.
    """
    pol = make_policy(policy, budget)
    lifted = _lift_parameters(gm, example_inputs)
    addmm = _prepare_uses(gm, lifted)
    holder = _holder(lifted)
    sites = [s for s in (_refine(site, gm) for site in find_sites(holder, gm)) if s is not None]
    the_plan: Plan | None = None
    try:
        if sites and any(r.in_scope for r in resolve(pol, sites).sites):
            if pol.objective == "data":
                log.warning("kronc backend: no calibration data reaches a torch.compile backend; planning on weight error")
            captured = Captured(holder, gm, sites, "fx")
            the_plan, weights = _plan_and_fit(captured, pol, progress)
            args = tuple(example_inputs) if verify else ()
            by_name = {s.name: s for s in sites}
            gm = materialize(the_plan, by_name, lambda site, spec: weights[site.name], graph=gm, args=args)  # type: ignore[assignment]
            _freeze_indices(gm)
            _register_sources(gm)
    finally:
        _restore(gm, lifted, addmm)
        gm.graph.lint()
        gm.recompile()
    return gm, the_plan


def _freeze_indices(gm: fx.GraphModule) -> None:
    """Make the compressed modules' sparse positions buffers, and their factors frozen.

    aot_autograd runs the graph's modules on fake tensors, swapping in every parameter and buffer;
    a sparse index keeps its decoded positions in a plain attribute, which would stay real. Each
    index is decoded once here; its positions become (non-persistent) buffers that ``decode``
    returns.
    """
    for mod in gm.children():
        if not isinstance(mod, (CompressedLinear, CompressedEmbedding)):
            continue
        mod.requires_grad_(False)
        for sub in mod.modules():
            if isinstance(sub, SparseIndex) and "kronc_rows" not in sub._buffers:
                rows, cols = sub.decode()
                sub.register_buffer("kronc_rows", rows, persistent=False)
                sub.register_buffer("kronc_cols", cols, persistent=False)
                sub.decode = types.MethodType(_decoded, sub)  # type: ignore[method-assign]


def _decoded(index: SparseIndex) -> tuple[Tensor, Tensor]:
    return index.kronc_rows, index.kronc_cols  # type: ignore[return-value]


def _register_sources(gm: fx.GraphModule) -> None:
    """Give each tensor the rewrite added a dynamo source.

    Dynamo records where every parameter of its graph module came from
    (``gm._param_name_to_source``) and aot_autograd requires an entry for each one (buffers too); the factors the
    rewrite added came from kronc, so they get guard-free constant sources named after them.
    """
    from torch._dynamo.source import ConstantSource

    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        return
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    for name in [*names, *(n for n, _ in gm.named_buffers(remove_duplicate=False))]:
        if name not in sources:
            sources[name] = ConstantSource(f"__kronc_{name.replace('.', '_')}")


# --------------------------------------------------------------------------------------------------
# the backend


def _inner_compile(
    gm: fx.GraphModule, example_inputs: Sequence[Any], inner: str | Callable[..., Any], mode: str | None,
    inductor: Mapping[str, Any],
) -> Callable[..., Any]:
    if callable(inner):
        return inner(gm, example_inputs)
    if inner == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = {**(list_mode_options(mode) if mode else {}), **inductor}
        return compile_fx(gm, example_inputs, config_patches=patches or None)  # type: ignore[return-value]
    from torch._dynamo.backends.registry import lookup_backend

    if inner == BACKEND_NAME:
        raise ValueError("options['inner'] cannot be 'kronc' itself")
    return lookup_backend(inner)(gm, list(example_inputs))


def kronc_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The ``"kronc"`` dynamo backend: compress the graph's weights, then compile it (see the module doc)."""
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown kronc backend option(s) {unknown}; the options are {list(OPTIONS)}")
    if opts.get("budget") is None and opts.get("policy") is None:
        raise ValueError(
            "the kronc backend needs a budget or a policy: torch.compile(model, backend='kronc', "
            "options={'budget': '4x'}) or options={'policy': 'edge-25x'}"
        )
    gm, the_plan = compress_graph(
        gm, example_inputs, opts.get("policy"), budget=opts.get("budget"),
        verify=bool(opts.get("verify", False)), progress=bool(opts.get("progress", False)),
    )
    if the_plan is not None:
        log.info("kronc backend: %d sites, %.2fx smaller", len(the_plan.decisions), the_plan.ratio)
        on_plan = opts.get("on_plan")
        if on_plan is not None:
            on_plan(the_plan)
    return _inner_compile(gm, example_inputs, opts.get("inner", "inductor"), mode, opts.get("inductor") or {})


def register() -> None:
    """Register `kronc_backend` as ``torch.compile(backend="kronc")`` (`kronc.register_backend`; idempotent)."""
    if BACKEND_NAME in list_backends(exclude_tags=()):
        return
    with contextlib.suppress(AssertionError):  # registered meanwhile (a reload): keep the first
        register_backend(kronc_backend, name=BACKEND_NAME)
