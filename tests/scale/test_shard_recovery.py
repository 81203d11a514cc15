"""End-to-end recovery with the student sharded by FSDP2 (``shard=True``) over two spawned gloo ranks, against
the data-parallel run and one process; checkpoints, resume, a NaN stop and bad input."""

from __future__ import annotations

import copy
import functools
import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from shard_test_helpers import nan_loss_at, outcome
from test_scale import _free_port

import kronc
from kronc.recover import RecoveryError

STEPS = 4


@functools.cache
def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The toy Llama and its compressed student (bf16 values, fp32 quantization scales and norms), compiled once."""
    from kronc.tools.toy import tiny_llama

    torch.manual_seed(0)
    teacher = tiny_llama(layers=2, width=32)
    return teacher, kronc.compile(teacher, budget="3x")


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 128, (4, 16), generator=g) for _ in range(STEPS)]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ordinary(student: torch.nn.Module, before: dict[torch.nn.Module, tuple[type, int]]) -> bool:
    """The student as it came in: every module's class and hook count, plain parameters."""
    from torch.distributed.tensor import DTensor

    hooks = {m: len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._load_state_dict_post_hooks)
             for m in student.modules()}
    return (all(type(m) is cls and hooks[m] == n for m, (cls, n) in before.items())
            and not any(isinstance(p, DTensor) for p in student.parameters()))


def _case(shard: bool, data: Any = None, **overrides: Any) -> dict[str, Any]:
    """The compressed toy distilled for `STEPS` steps; the student's weights, the logged losses, whether it came
    back ordinary, and (sharded) the parameter and AdamW bytes this rank held at each step."""
    from kronc.recover.sharding import local_bytes

    loop = importlib.import_module("kronc.recover.loop")  # ``kronc.recover`` is also the function

    teacher, student = copy.deepcopy(_models())
    before = {m: (type(m), len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._load_state_dict_post_hooks))
              for m in student.modules()}
    held: list[tuple[int, int]] = []
    make = loop.make_optimizer

    def spy(model: torch.nn.Module, params: Any, cfg: Any) -> torch.optim.Optimizer:
        opt = make(model, params, cfg)
        opt.register_step_post_hook(lambda o, *_: held.append((local_bytes(model), _state_bytes(o))))
        return opt

    loop.make_optimizer = spy  # type: ignore[assignment]
    try:
        result = kronc.recover(student, teacher, _batches() if data is None else data, steps=STEPS, lr=1e-3,
                               hidden=0.0, progress=False, shard=shard, **overrides)
    finally:
        loop.make_optimizer = make  # type: ignore[assignment]
    return {"weights": _weights(student), "losses": torch.tensor([r.loss for r in result.history], dtype=torch.float64),
            "ordinary": _ordinary(student, before), "held": held, "steps": result.steps, "stopped": result.stopped}


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    from torch.distributed.tensor import DTensor

    local = [t.to_local() if isinstance(t, DTensor) else t for s in optimizer.state.values() for t in s.values()]
    return sum(t.numel() * t.element_size() for t in local if t.dim())


def _blockwise(shard: bool) -> dict[str, torch.Tensor]:
    """Block-wise reconstruction (data-parallel blocks) whose end-to-end pass is sharded or not."""
    teacher, student = copy.deepcopy(_models())
    kronc.recover(student, teacher, _batches(), method="blockwise", hidden=0.0, progress=False, shard=shard,
                  blockwise={"samples": 4, "epochs": 1, "lr": 1e-3, "e2e_steps": 2})
    return _weights(student)


def _nan_at_third_step() -> dict[str, Any]:
    """Sharded recovery whose third step's loss is NaN (a patched distiller), and the error it raised."""
    teacher, student = copy.deepcopy(_models())
    error: RecoveryError | None = None
    with nan_loss_at(3):
        try:
            kronc.recover(student, teacher, _batches(), steps=STEPS, lr=1e-3, hidden=0.0, progress=False, shard=True)
        except RecoveryError as e:
            error = e
    assert error is not None
    return {"weights": _weights(student), "step": error.step, "restored": error.restored_step}


def _shard_main(rank: int, world: int, port: int, results: str) -> None:
    import torch.distributed as dist

    from kronc.recover.schemes import MovementScores

    torch.set_num_threads(1)  # two ranks on shared cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ckpt, part = Path(results, "sharded.ckpt"), Path(results, "part.ckpt")
        ids = torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(2))
        out: dict[str, Any] = {
            "refused": [outcome(lambda: _case(True, ids, batch_size=3, seq_len=16)),
                        outcome(lambda: kronc.recover(*copy.deepcopy(_models())[::-1], _batches(), shard=True,
                                                       schemes=[MovementScores()], progress=False))],
            "sharded": _case(True, checkpoint_path=str(ckpt)),
            "replicated": _case(False),
            # interrupted after 2 steps (a one-shot iterator runs out), then resumed from the checkpoint
            "part": _case(True, iter(_batches()[:2]), checkpoint_path=str(part)),
            "resumed": _case(True, iter(_batches()), checkpoint_path=str(part), resume=True),
            "nan": _nan_at_third_step(),
            "again": _case(True),  # the student handed back can be sharded again
            "blockwise": [_blockwise(True), _blockwise(False)],
        }
        torch.save(out, Path(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _apart(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """How far apart two trained students are, relative to how far training moved the student."""
    keys = [k for k in start if start[k].is_floating_point()]
    update = torch.cat([(b[k] - start[k]).reshape(-1).double() for k in keys])
    apart = torch.cat([(a[k] - b[k]).reshape(-1).double() for k in keys])
    assert update.norm() > 0, "recovery changed nothing: the comparison would be vacuous"
    return float(apart.norm() / update.norm())


@pytest.mark.slow
def test_sharded_recovery_matches_data_parallel_and_one_process(tmp_path: Path) -> None:
    """FSDP2 over two ranks: each rank holds half of every parameter and of AdamW's state; the trained student
    equals the data-parallel run's and one process's up to float summation order; it comes back an ordinary
    model; the checkpoint holds whole tensors and resumes to the same weights; a NaN puts it back whole; block-wise
    reconstruction's end-to-end pass shards."""
    torch.multiprocessing.spawn(_shard_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    r0 = ranks[0]
    for r in ranks:
        assert r["refused"][0].startswith("RecoveryError: batch_size has 3 rows, which do not split evenly over 2 ranks")
        assert r["refused"][1].startswith("RecoveryError: shard=True takes no schemes"), r["refused"][1]
    start = _weights(_models()[1])
    one = _case(False)

    sharded = r0["sharded"]
    assert all(torch.equal(sharded["weights"][k], ranks[1]["sharded"]["weights"][k]) for k in start)
    assert sharded["ordinary"] and sharded["steps"] == STEPS
    # data-parallel on the same two ranks: bit-identical (each reduction adds the same two numbers, in either
    # order, and halves them; the gradients are far below grad_clip, so the differently summed norm clips nothing)
    assert all(torch.equal(sharded["weights"][k], r0["replicated"]["weights"][k]) for k in start)
    assert torch.equal(sharded["losses"], r0["replicated"]["losses"])
    # one process: the same first loss (same weights, same rows), then the same steps up to the order of float
    # sums over the batch (two halves added, against one sum), which AdamW amplifies where second moments are
    # near zero: compared on the whole update (2.3% here, as the data-parallel run's)
    torch.testing.assert_close(sharded["losses"][0], one["losses"][0], rtol=1e-6, atol=0)
    assert _apart(sharded["weights"], one["weights"], start) < 5e-2

    full = r0["replicated"]["held"][0][0]  # the whole student's parameters while it trains (scales as fp32 included)
    held = [r["sharded"]["held"] for r in ranks]
    assert len(held[0]) == STEPS and all(h == held[0][0] for h in held[0])
    params, state = [h[0][0] for h in held], [h[0][1] for h in held]
    assert sum(params) == full, (params, full)  # the shards partition every parameter, frozen ones included
    assert all(0.4 < p / full < 0.6 for p in params), (params, full)
    replicated_state = r0["replicated"]["held"][0][1]
    assert sum(state) == replicated_state and all(0.4 < s / replicated_state < 0.6 for s in state), (state,
                                                                                                    replicated_state)

    from kronc.recover.checkpoint import _read
    from kronc.recover.scales import scales_trained

    saved = _read(tmp_path / "sharded.ckpt")["student"]
    student = copy.deepcopy(_models()[1])
    with scales_trained(student):  # a checkpoint is taken while the scales train (as fp32 parameters)
        assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in student.state_dict().items()}
    unscaled = [k for k in start if not k.endswith(("scales", "minima"))]  # stored scales are committed at the end
    assert all(torch.equal(saved[k], sharded["weights"][k]) for k in unscaled)  # the final state, whole

    part, resumed = r0["part"], r0["resumed"]
    assert (part["steps"], part["stopped"]) == (2, "data")
    assert all(torch.equal(resumed["weights"][k], sharded["weights"][k]) for k in start)  # bit-identical

    nan = r0["nan"]
    assert (nan["step"], nan["restored"]) == (2, 0)
    assert all(torch.equal(nan["weights"][k], start[k]) for k in start)  # the starting state, gathered whole
    assert all(torch.equal(r0["again"]["weights"][k], sharded["weights"][k]) for k in start)
    blockwise_sharded, blockwise = r0["blockwise"]
    assert all(torch.equal(blockwise_sharded[k], blockwise[k]) for k in start)  # its end-to-end pass, sharded
    assert any(not torch.equal(blockwise[k], start[k]) for k in start)


def test_shard_without_a_process_group_is_refused() -> None:
    teacher, student = copy.deepcopy(_models())
    for method in ("distill", "blockwise"):
        with pytest.raises(RecoveryError, match="shard=True needs an initialised torch.distributed process group") as e:
            kronc.recover(student, teacher, _batches(), method=method, steps=1, shard=True, progress=False)
        assert "\n" not in str(e.value)
    assert torch.equal(student.state_dict()["lm_head.weight"], _models()[1].state_dict()["lm_head.weight"])


@pytest.mark.slow
def test_shard_on_one_rank_trains_unsharded(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 1``: nothing to share the student with; the run is the plain one, bit for bit."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        sharded = _case(True)
    finally:
        dist.destroy_process_group()
    plain = _case(False)
    assert all(torch.equal(sharded["weights"][k], plain["weights"][k]) for k in plain["weights"])


def _failing_forward_main(rank: int, world: int, port: int, results: str) -> None:
    """Rank 1 raises in the second step's forward of a sharded run; every rank writes what it raised."""
    import datetime

    import torch.distributed as dist

    from kronc.recover.losses import Distiller

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    calls, losses = [0], Distiller.losses

    def broken(self: Distiller, batch: Any) -> dict[str, torch.Tensor]:
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            raise ValueError("sabotaged forward on rank 1")
        return losses(self, batch)

    Distiller.losses = broken  # type: ignore[method-assign]
    Path(results, f"rank{rank}.txt").write_text(outcome(lambda: _case(True)))
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_rank_failing_inside_a_sharded_step_stops_the_job(tmp_path: Path) -> None:
    """Sharded, the other ranks wait inside FSDP2's gathers, not at the step's flag exchange: the failing rank
    raises its own error at once and leaves; the others stop when its connection closes (not at the timeout)."""
    torch.multiprocessing.spawn(_failing_forward_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank1.txt").read_text() == "ValueError: sabotaged forward on rank 1"
    rank0 = (tmp_path / "rank0.txt").read_text()
    assert "Connection closed by peer" in rank0 or "Connection reset by peer" in rank0, rank0  # which: timing


def test_cli_recover_shard_needs_torchrun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kronc.tools.cli import EXIT_INPUT, main

    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 50)
    assert main(["compress", "toy:llama", "--budget", "3x", "--out", str(tmp_path / "a"), "--recover-shard"]) == EXIT_INPUT
    assert "need --recover-text" in capsys.readouterr().err
    assert main(["compress", "toy:llama", "--budget", "3x", "--out", str(tmp_path / "b"), "--recover-text", str(text),
                 "--recover-shard"]) == EXIT_INPUT
    assert "shards the student over torchrun's ranks" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_recover_shard_under_torchrun(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m kronc compress ... --recover-shard``: both ranks compress, recover sharded,
    rank 0 alone prints and saves an ordinary kronc model."""
    import os
    import subprocess
    import sys

    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 400)
    out = tmp_path / "small"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(kronc.__file__).parent.parent)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "kronc", "compress", "toy:llama", "--budget", "3x", "--recover-text",
                          str(text), "--recover-steps", "2", "--recover-shard", "--out", str(out), "-q"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[:3000] + "\n...\n" + run.stderr[-800:]
    assert run.stdout.count("recovered on text.txt: 2 steps (steps)") == 1, run.stdout[-2000:]
    small = kronc.load(out)
    assert small(torch.randint(0, 64, (1, 8))).logits.isfinite().all()
