"""End-to-end recovery with the student sharded over the ranks by FSDP2 (``shard=True``).

Data-parallel recovery (`kronc.recover.parallel`) keeps the whole student, its gradients and its AdamW
state on every rank. With ``shard=True`` under a process group, `sharded` applies
`torch.distributed.fsdp.fully_shard` to each block of the student (the chain
`kronc.recover.blocks.find_blocks` finds from one probe forward) and then to the student itself, on a
one-dimensional device mesh over every rank: each rank holds ``1/world`` of every parameter (trained or
frozen), of every gradient and of the optimizer state, and a block's parameters are gathered whole only
while that block runs forward or backward. Buffers (the integer codes and stored scales of quantized
tensors, sparse indices) are not parameters: FSDP2 leaves them whole on every rank.

Why FSDP2 and not FSDP1: it keeps every module object and its name (it swaps each parameter for a
sharded ``DTensor`` and changes the module's class), so the distiller's hooks on named modules and the
formats' own forwards (kronc:: ops included) run unchanged on ordinary tensors inside each forward.

On exit the student is made ordinary again on every rank (`_unshard`): every parameter is gathered whole
(``DTensor.full_tensor``) into a plain ``nn.Parameter``, and what ``fully_shard`` added to each module
(its class, its hooks, its attributes, torch's registry entry) is removed, so the student saves, loads,
copies and can be sharded again like the model that came in. Gathering is a collective: every rank must
reach the exit together. They do after a normal end, a NaN (decided on averaged losses) and a failure the
ranks exchanged (`parallel.shared_failures` around rank 0's checkpoint write); a rank that raises inside a
step's forward or backward cannot reach the others (they wait inside FSDP2's gathers), so it raises at once
and leaves its student sharded, and the others stop when its connection closes.

Two names come from torch's private modules, both part of the documented ``fully_shard`` behaviour:
``ShardPlacementResult``/``FSDPMeshInfo`` (the per-parameter mesh of ``shard_placement_fn``, see
`_placement_by_dtype`) and the composable-API registry that `_unshard` clears.

A student given as a save folder (`kronc.recover.from_save`) arrives on the meta device: `sharded` shards it the
same way, then allocates it and has each rank read only its shards from the files, and on exit writes it as a
sharded save unit by unit instead of gathering it whole.

Not sharded: the teacher (it runs without gradients or optimizer state; it must fit each rank), the
training schemes (they read whole parameters and gradients between steps, where FSDP2 holds only a
shard: refused), and block-wise reconstruction's block phase (one block's gradients and AdamW state are
small; its end-to-end pass is sharded when ``shard=True``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..scale import distributed as dist
from . import from_save
from .batches import Batch, BatchSource
from .blocks import find_blocks
from .checkpoint import Snapshot
from .config import RecoveryError
from .from_save import SavedStudent
from .guards import device_of

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
"""The per-module hook dicts ``fully_shard`` adds to (forward hooks, state-dict hooks of the sharded
parameters' modules); `_unshard` drops every entry that was not there before."""


def check_shard(schemes: list[Any]) -> bool:
    """Whether this run shards (a process group of two or more ranks); a one-line `RecoveryError` when
    ``shard=True`` cannot work. One rank (``torchrun --nproc_per_node 1``) has nothing to share the student
    with: it trains unsharded."""
    if not dist.active():
        raise RecoveryError("shard=True needs an initialised torch.distributed process group: launch with torchrun "
                            "(kronc joins it) or call torch.distributed.init_process_group first")
    if schemes:
        raise RecoveryError("shard=True takes no schemes: they read whole parameters and gradients between steps, "
                            "where FSDP2 holds only this rank's shard; run them without shard")
    return dist.world() > 1


@dataclass
class _Saved:
    """What a module was before ``fully_shard``: its class, its attribute names and its hooks' ids."""

    cls: type
    attributes: set[str]
    hooks: dict[str, set[int]]


def _units(student: nn.Module, teacher: nn.Module, probe: Batch) -> list[nn.Module]:
    """The student's blocks (one FSDP2 unit each), from one forward on the probe's first row; none when the
    student has no block chain made of its own submodules (an LSTM's layer views): the root is then the only unit."""
    def first_row(x: Any) -> Any:
        return x[:1] if isinstance(x, Tensor) and x.dim() else x

    args = tuple(first_row(a) for a in probe.args)
    kwargs = {k: first_row(v) for k, v in probe.kwargs.items()}
    training = [(m, m.training) for m in student.modules()]
    try:
        student.eval()
        chain = find_blocks(student, teacher, args, kwargs)
    except RecoveryError:
        return []
    finally:
        for m, flag in training:
            m.training = flag
    own = {id(m) for m in student.modules()}
    blocks = [b.student for b in chain.blocks]
    return blocks if all(id(b) in own for b in blocks) else []


_extra: tuple[Any, list[Any]] = (None, [])
"""The default process group the extra meshes were made under, and the meshes (made once, then reused: torch
caches sharding decisions by mesh, so a destroyed group would be looked up again)."""


def _extra_mesh(i: int, device_type: str) -> Any:
    """The ``i``-th extra mesh over every rank, on a process group of its own (made when first needed; every
    rank asks for them in the same order, as creating a group is a collective)."""
    from torch.distributed.device_mesh import DeviceMesh

    global _extra
    world = torch.distributed.group.WORLD
    if _extra[0] is not world:
        _extra = (world, [])
    made = _extra[1]
    while len(made) <= i:
        made.append(DeviceMesh.from_group(torch.distributed.new_group(list(range(dist.world()))), device_type))
    return made[i]


def _placement_by_dtype(student: nn.Module, mesh: Any) -> Any:
    """FSDP2's ``shard_placement_fn`` that puts each dtype's parameters on a mesh of its own.

    One FSDP2 group gathers and reduces its trained parameters in one flat buffer, so they must share a dtype;
    a compressed block mixes them (bf16 factors, fp32 quantization scales and norms). FSDP2 groups a unit's
    parameters by process group, so one process group over the same ranks per dtype (the commonest keeps
    ``mesh``) gives each unit one group per dtype."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, ShardPlacementResult
    from torch.distributed.tensor import Shard

    counts: dict[torch.dtype, int] = {}
    for p in student.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    order = sorted(counts, key=lambda d: (-counts[d], str(d)))
    meshes = {order[0]: mesh, **{d: _extra_mesh(i, mesh.device_type) for i, d in enumerate(order[1:])}}
    infos = {d: FSDPMeshInfo(m, shard_mesh_dim=0) for d, m in meshes.items()}

    def place(p: nn.Parameter) -> Any:
        return ShardPlacementResult(Shard(0), infos[p.dtype])

    return place


@contextmanager
def sharded(student: nn.Module, teacher: nn.Module, probe: Batch, folder: SavedStudent | None = None) -> Iterator[None]:
    """``student`` sharded over every rank by FSDP2 inside the block, an ordinary module again after it.

    With ``folder``, ``student`` is on the meta device: sharded first, then allocated and filled rank by rank from
    its save folder, and written to ``folder.out`` on exit instead of being gathered (`kronc.recover.from_save`).
    Set ``requires_grad`` before entering: FSDP2 copies each parameter's flag into its shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    units = _units(student, teacher if folder is None else student, probe)  # on meta: the student's own forward
    saved = {m: _Saved(type(m), set(m.__dict__), {h: set(getattr(m, h)) for h in _HOOK_DICTS})
             for m in student.modules()}
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (dist.world(),))
    place = _placement_by_dtype(student, mesh)
    for unit in units:
        fully_shard(unit, mesh=mesh, shard_placement_fn=place)
    fully_shard(student, mesh=mesh, shard_placement_fn=place)
    if folder is not None:
        student.to_empty(device=device)
        from_save.fill(student, folder)
        yield  # a failure leaves nothing to put back: the student is written on success only
        from_save.write(student, units, folder)
        return
    try:
        yield
    except BaseException as e:
        if _every_rank(e):
            _unshard(student, saved)
        raise
    _unshard(student, saved)


def _every_rank(error: BaseException) -> bool:
    """Whether every rank raises at the same point (so all of them can gather the student whole): a loss or
    gradient that turned NaN/inf (decided on values averaged over the ranks), or a failure the ranks exchanged
    (`kronc.scale.distributed.fail`: the failing rank's own error and the others' `RankFailed`)."""
    return (isinstance(error, dist.RankFailed) or bool(getattr(error, "_kronc_sent", False))
            or (isinstance(error, RecoveryError) and error.step is not None))


def full_tensor(t: Any) -> Any:
    """``t`` whole when it is a sharded ``DTensor`` (a collective: every rank calls it), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _unshard(student: nn.Module, saved: dict[nn.Module, _Saved]) -> None:
    """Gather every parameter whole and undo what ``fully_shard`` did to each module (see the module docstring)."""
    from torch.distributed.fsdp import FSDPModule

    for m in student.modules():
        if isinstance(m, FSDPModule):
            m.reshard()  # a step stopped mid-forward leaves gathered parameters registered: shards on every rank
    whole: dict[int, nn.Parameter] = {}
    for _, p in student.named_parameters():  # same order on every rank: the gathers pair up
        whole[id(p)] = nn.Parameter(full_tensor(p.detach()), requires_grad=p.requires_grad)
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # a torch without the registry: nothing to forget
        _module_state_mapping = {}  # type: ignore[assignment]
    for m, before in saved.items():
        for name, shard in list(m._parameters.items()):
            if shard is not None and id(shard) in whole:
                m._parameters[name] = whole[id(shard)]
        for h, ids in before.hooks.items():
            hooks = getattr(m, h)
            for k in [k for k in hooks if k not in ids]:
                del hooks[k]
        for attribute in set(m.__dict__) - before.attributes:
            del m.__dict__[attribute]
        m.__class__ = before.cls
        _module_state_mapping.pop(m, None)


def local_bytes(module: nn.Module) -> int:
    """Bytes of parameters this rank holds: the local shards of sharded parameters, whole tensors otherwise."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in module.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total


@contextmanager
def sharded_params(student: nn.Module, teacher: nn.Module, batches: BatchSource, params: dict[str, nn.Parameter],
                   shard: bool, folder: SavedStudent | None = None) -> Iterator[dict[str, nn.Parameter]]:
    """The trained parameters by name: ``params`` as they are, or (``shard``) the student's sharded ones while
    `sharded` holds it, with ``requires_grad`` set to the selection first (FSDP2 copies the flags). Sharding
    empties ``params``: holding the whole parameters would keep their memory after FSDP2 replaced them."""
    if not shard:
        yield params
        return
    names = _select(student, params)
    probe = batches.peek()
    if probe is None:
        raise RecoveryError("the data yielded no batches")
    with sharded(student, teacher, probe.to(device_of(student)), folder):
        named = dict(student.named_parameters())
        yield {name: named[name] for name in names}


def _select(student: nn.Module, params: dict[str, nn.Parameter]) -> list[str]:
    """Set ``requires_grad`` to the selection, empty ``params`` and return the selected names (in a function of
    its own: a loop variable left in the caller's frame would hold a whole parameter)."""
    chosen = {id(p) for p in params.values()}
    for p in student.parameters():
        p.requires_grad_(id(p) in chosen)
    names = list(params)
    params.clear()
    return names


def whole_snapshot(snap: Snapshot) -> Snapshot:
    """``snap`` with its student tensors and optimizer state gathered whole (a collective): what a checkpoint file
    holds, the same as an unsharded run's."""
    student = {k: full_tensor(v) for k, v in snap.student.items()}
    optimizer = {**snap.optimizer, "state": {i: {k: full_tensor(v) for k, v in s.items()}
                                             for i, s in snap.optimizer["state"].items()}}
    return replace(snap, student=student, optimizer=optimizer)


def local_snapshot(snap: Snapshot, student: nn.Module, optimizer: torch.optim.Optimizer) -> Snapshot:
    """A checkpoint file's whole tensors cut to this rank's shards of the sharded ``student`` and ``optimizer`` (each
    rank takes its own piece of the tensors it read: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def like(t: Any, live: Any) -> Any:
        if isinstance(live, DTensor) and isinstance(t, Tensor) and not isinstance(t, DTensor) and t.shape == live.shape:
            return distribute_tensor(t.to(live.dtype), live.device_mesh, live.placements, src_data_rank=None)
        return t

    live_state = student.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {i: {k: like(v, params[i]) if isinstance(i, int) and i < len(params) else v for k, v in s.items()}
             for i, s in snap.optimizer.get("state", {}).items()}
    return replace(snap, student={k: like(v, live_state.get(k)) for k, v in snap.student.items()},
                   optimizer={**snap.optimizer, "state": state})
