"""Find a model's blocks (decoder/encoder layers, LSTM layers) from how data flows through it.

Block-wise reconstruction needs the chain of sub-modules that carry the residual stream: block
``i + 1`` reads what block ``i`` wrote, so a block can be trained on the outputs of the blocks before
it and its own output handed on. Nothing here knows an architecture by name. One forward pass with
hooks on every module records each call's input and output tensors; a networkx graph gets an edge
``producer -> consumer`` wherever a module reads a tensor another module returned. Candidates are the
children of each ``ModuleList`` / ``Sequential`` that share a class and run once each; a candidate is
a chain when its children form a path in that graph (each child's stream input is its predecessor's
output). The chain holding the most parameters wins (the decoder layers, not a list inside a layer).

Multi-layer recurrent modules (``nn.LSTM``, kronc's ``CompressedLSTM``) run their layers inside one
``forward``, with no module per layer; each layer becomes a block through a one-layer view that shares
the parameters of the original (so training the view trains the student). Recurrent modules that are
siblings rather than list items (textgenrnn's ``rnn_1 -> rnn_2``) are chained the same way, from the
graph: a recurrent module whose input (and only tensor input, no initial state) is another recurrent
module's output continues that module's chain, and every layer of every module in it is a block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import networkx as nx
import torch
from torch import Tensor, nn

from ..modules import CompressedLSTM
from .config import RecoveryError

Slot = int | str
"""Where a block's stream input sits in its call: a position in ``args`` or a keyword name."""

_RECURRENT = (nn.LSTM, CompressedLSTM)


@dataclass
class Block:
    """One reconstruction unit: the student's module (trained) and the teacher's (the target)."""

    name: str
    student: nn.Module
    teacher: nn.Module
    slot: Slot


@dataclass
class BlockChain:
    """The blocks in the order the stream visits them, and the student and teacher modules whose calls hold
    the first block's inputs (the first block itself, or the recurrent module a layer view comes from)."""

    container: str
    blocks: list[Block]
    entry: nn.Module
    teacher_entry: nn.Module
    recurrent: list[str] = field(default_factory=list)
    """The recurrent modules the blocks are layer views of, in stream order (empty for a list of blocks)."""


@dataclass
class _Call:
    inputs: dict[Slot, int]
    outputs: set[int]
    count: int = 0


def _tensors(x: Any) -> Iterator[Tensor]:
    """Tensors of an output: the value itself, or the items of a tuple / list / dict / ModelOutput."""
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            if isinstance(v, Tensor):
                yield v
    elif isinstance(x, dict):
        for v in x.values():
            if isinstance(v, Tensor):
                yield v


def first_tensor(out: Any) -> Tensor:
    """The stream a block hands on: its output, or the first tensor of a tuple / ModelOutput."""
    for t in _tensors(out):
        return t
    raise RecoveryError(f"a block returned a {type(out).__name__} with no tensor in it")


def call_graph(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[nx.DiGraph, dict[str, _Call]]:
    """Run ``model`` once and return the module data-flow graph (nodes: module names) and each call's tensors.

    An edge ``a -> b`` with attribute ``slot`` means module ``b`` read, at that slot, a tensor that
    ``a`` returned; when a wrapper returns its child's tensor the wrapper (whose hook runs last) is
    taken as the producer.
    """
    calls: dict[str, _Call] = {}
    keep: list[Tensor] = []  # hold every tensor seen, so no id is reused during the pass
    producer: dict[int, str] = {}
    graph = nx.DiGraph()
    handles = []

    def pre(name: str) -> Any:
        def hook(module: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            slots: dict[Slot, int] = {i: id(v) for i, v in enumerate(a) if isinstance(v, Tensor)}
            slots.update({k: id(v) for k, v in kw.items() if isinstance(v, Tensor)})
            keep.extend(v for v in (*a, *kw.values()) if isinstance(v, Tensor))
            call = calls.setdefault(name, _Call(slots, set()))
            call.count += 1
            graph.add_node(name)
            for slot, tid in slots.items():
                if tid in producer and producer[tid] != name:
                    graph.add_edge(producer[tid], name, slot=slot)

        return hook

    def post(name: str) -> Any:
        def hook(module: nn.Module, a: tuple[Any, ...], kw: dict[str, Any], out: Any) -> None:
            outs = list(_tensors(out))
            keep.extend(outs)
            for t in outs:
                producer[id(t)] = name
                calls[name].outputs.add(id(t))

        return hook

    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(m.register_forward_hook(post(name), with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return graph, calls


def _candidates(model: nn.Module) -> Iterator[tuple[str, list[str]]]:
    """``(container, child names)`` for each ModuleList / Sequential whose children share one class."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0:
            kinds = {type(c) for c in m}
            if len(kinds) == 1:
                prefix = f"{name}." if name else ""
                yield name, [f"{prefix}{k}" for k, _ in m.named_children()]


def _chain_slots(graph: nx.DiGraph, calls: dict[str, _Call], names: list[str]) -> list[Slot] | None:
    """The stream slot of each child when ``names`` is a chain in ``graph`` (each runs once and reads
    its predecessor's output), else None."""
    if any(n not in calls or calls[n].count != 1 for n in names):
        return None
    if len(names) > 1 and not nx.is_path(graph, names):
        return None
    slots = [graph.edges[a, b]["slot"] for a, b in pairwise(names)]
    first = calls[names[0]].inputs
    if not first:
        return None
    head = slots[0] if slots else (0 if 0 in first else next(iter(first)))  # block 0 reads where block 1 does
    return [head, *slots]


def _recurrent_chains(graph: nx.DiGraph, calls: dict[str, _Call], names: list[str]) -> Iterator[list[str]]:
    """Chains of the recurrent modules ``names`` (each called once): a module continues the chain of the one whose
    output it reads as its input, when that is its only tensor input (no initial state from elsewhere)."""
    recurrent = set(names)

    def successor(name: str) -> str | None:
        nxt = [b for b in graph.successors(name) if b in recurrent and graph.edges[name, b]["slot"] == 0
               and set(calls[b].inputs) == {0}]
        return nxt[0] if len(nxt) == 1 else None

    followers = {s for n in names if (s := successor(n)) is not None}
    for head in names:
        if head in followers:
            continue
        chain = [head]
        while (nxt := successor(chain[-1])) is not None and nxt not in chain:
            chain.append(nxt)
        yield chain


def _param_count(modules: list[nn.Module]) -> int:
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def lstm_layer(lstm: nn.Module, layer: int) -> nn.Module:
    """A one-layer module that runs ``layer`` of a multi-layer LSTM, sharing its parameters (no copies)."""
    if isinstance(lstm, CompressedLSTM):
        view = CompressedLSTM.__new__(CompressedLSTM)
        nn.Module.__init__(view)
        view.input_size = lstm.input_size if layer == 0 else lstm.hidden_size
        view.hidden_size, view.num_layers = lstm.hidden_size, 1
        view.batch_first, view.dropout = lstm.batch_first, 0.0
        view.ih, view.hh = nn.ModuleList([lstm.ih[layer]]), nn.ModuleList([lstm.hh[layer]])
        view.bias_ih = nn.ParameterList([lstm.bias_ih[layer]] if len(lstm.bias_ih) else [])
        view.bias_hh = nn.ParameterList([lstm.bias_hh[layer]] if len(lstm.bias_hh) else [])
        return view
    assert isinstance(lstm, nn.LSTM)
    if lstm.bidirectional or lstm.proj_size:
        raise RecoveryError("block-wise reconstruction splits unidirectional LSTMs without projections only")
    size = lstm.input_size if layer == 0 else lstm.hidden_size
    one = nn.LSTM(size, lstm.hidden_size, 1, bias=lstm.bias, batch_first=lstm.batch_first, device="meta")
    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        if hasattr(lstm, f"{kind}_l{layer}"):
            setattr(one, f"{kind}_l0", getattr(lstm, f"{kind}_l{layer}"))
    one._init_flat_weights()
    return one


def find_blocks(student: nn.Module, teacher: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BlockChain:
    """The student's block chain, paired with the teacher's modules of the same names.

    ``args`` / ``kwargs`` are one (small) model input; the student runs once on it without gradients.
    Raises `RecoveryError` in one line when no chain is found or the teacher lacks a block.
    """
    graph, calls = call_graph(student, args, kwargs)
    modules = dict(student.named_modules())
    teacher_modules = dict(teacher.named_modules())
    options: list[tuple[int, str, list[str], list[Slot]]] = []
    for container, names in _candidates(student):
        slots = _chain_slots(graph, calls, names)
        if slots is not None:
            options.append((_param_count([modules[n] for n in names]), container, names, slots))
    recurrent = [n for n, m in modules.items() if isinstance(m, _RECURRENT) and n in calls and calls[n].count == 1]
    for names in _recurrent_chains(graph, calls, recurrent):
        options.append((_param_count([modules[n] for n in names]), "+".join(names), names, [0] * len(names)))
    if not options:
        raise RecoveryError(f"no block structure found in {type(student).__name__}: no ModuleList/Sequential of "
                            "same-class modules that feed one another in turn, and no multi-layer LSTM")
    _, container, names, slots = max(options, key=lambda o: o[0])
    missing = [n for n in names if n not in teacher_modules]
    if missing:
        raise RecoveryError(f"the teacher has no module {missing[0]!r} (block {names.index(missing[0])} of the "
                            f"student's {container!r}): the teacher must be the model the student was compressed from")
    if isinstance(modules[names[0]], _RECURRENT):
        blocks = []
        for name in names:
            s, t = modules[name], teacher_modules[name]
            if not isinstance(t, _RECURRENT) or t.num_layers != s.num_layers:
                raise RecoveryError(f"the teacher's {name!r} is not an LSTM with {s.num_layers} layers like the student's")
            blocks += [Block(f"{name}[layer {k}]", lstm_layer(s, k), lstm_layer(t, k), 0) for k in range(s.num_layers)]
        return BlockChain(container, blocks, modules[names[0]], teacher_modules[names[0]], list(names))
    blocks = [Block(n, modules[n], teacher_modules[n], slot) for n, slot in zip(names, slots, strict=True)]
    return BlockChain(container, blocks, blocks[0].student, blocks[0].teacher)
