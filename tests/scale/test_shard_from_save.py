"""Sharded recovery from a save folder (`kronc.recover.from_save`) over two spawned gloo ranks: the student is built
on the meta device, each rank fills only its shards from the files, and the recovered student is written as a sharded
save block by block; against the whole-student sharded run; memory per rank; resume; bad input."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from shard_test_helpers import nan_loss_at, outcome
from test_scale import _free_port

import kronc
from kronc.recover import RecoveryError
from kronc.serialize import KroncFileError

transformers = pytest.importorskip("transformers")

STEPS = 3
RUN = {"steps": STEPS, "lr": 1e-3, "hidden": 0.0, "progress": False, "shard": True, "batch_size": 4, "seq_len": 16}


def _ids() -> list[torch.Tensor]:
    """`STEPS` batches of 4 rows (2 per rank)."""
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 128, (4, 16), generator=g) for _ in range(STEPS)]


def _teacher(folder: Path) -> torch.nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama in transformers' shards and its streamed-compile save (one shard per block, int8 and bf16)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("fromsave")
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(root / "hf", max_shard_size="60KB")
    out = kronc.compile(str(root / "hf"), budget="3x", stream=True, out=root / "small")
    return root / "hf", Path(out)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _from_save(folder: Path, teacher: torch.nn.Module, out: Path, data: Any = None, **extra: Any) -> dict[str, Any]:
    """Recovery of the save ``folder`` into ``out``; the bytes this rank held right after the fill (parameters as local
    shards, buffers) and the result."""
    from torch.distributed.tensor import DTensor

    from_save = importlib.import_module("kronc.recover.from_save")
    held: dict[str, int] = {}
    fill = from_save.fill

    def spy(student: torch.nn.Module, where: Any) -> None:
        fill(student, where)
        local = [p.to_local() if isinstance(p, DTensor) else p for p in student.parameters()]
        held["params"] = sum(t.numel() * t.element_size() for t in local)
        held["buffers"] = sum(b.numel() * b.element_size() for b in student.buffers())
        held["meta"] = sum(t.is_meta for t in (*local, *student.buffers()))

    from_save.fill = spy
    try:
        result = kronc.recover(str(folder), teacher, _ids() if data is None else data, out=out, **RUN, **extra)
    finally:
        from_save.fill = fill
    return {"held": held, "losses": result.series("loss"), "saved": result.saved, "steps": result.steps}


def _main(rank: int, world: int, port: int, hf: str, small: str, results: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        teacher, res = _teacher(Path(hf)), Path(results)
        out: dict[str, Any] = {"refused": [outcome(lambda f=f: kronc.recover(f, teacher, _ids(), out=res / "x", **RUN))
                                           for f in (hf, str(res / "corrupt"))]}
        out["refused"].append(outcome(lambda: kronc.recover(small, teacher, _ids(), out=res / "taken", **RUN)))
        out["refused"].append(outcome(lambda: kronc.recover(small, teacher, _ids(), out=res / "x", **{**RUN, "shard": False})))
        out["streamed"] = _from_save(Path(small), teacher, res / "streamed")
        whole = kronc.load(small)
        out["whole_losses"] = kronc.recover(whole, teacher, _ids(), **RUN).series("loss")
        out["whole"] = _weights(whole)
        # stopped after 2 steps (a one-shot iterator runs out), then resumed from its checkpoint
        out["part"] = _from_save(Path(small), teacher, res / "part", iter(_ids()[:2]), checkpoint_path=str(res / "c.ckpt"))
        out["resumed"] = _from_save(Path(small), teacher, res / "resumed", iter(_ids()), checkpoint_path=str(res / "c.ckpt"),
                                    resume=True)
        out["nan"] = _nan_at_second_step(small, teacher, res / "nan")
        torch.save(out, res / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _nan_at_second_step(small: str, teacher: torch.nn.Module, out: Path) -> str:
    """A from-save run whose second step's loss is NaN (a patched distiller): what it raised."""
    with nan_loss_at(2):
        return outcome(lambda: kronc.recover(small, teacher, _ids(), out=out, **RUN))


@pytest.mark.slow
def test_recovery_from_a_save_folder_matches_the_whole_student_run(saved: tuple[Path, Path], tmp_path: Path) -> None:
    """Two gloo ranks: the save written block by block equals the whole-student sharded run's student bit for bit,
    and so does a run stopped after 2 steps and resumed from its checkpoint;
    right after the fill each rank holds half the parameter bytes (the two ranks' shards add up to the whole) plus
    the buffers whole, and nothing stays on meta; bad input fails in one line before training."""
    hf, small = saved
    corrupt = tmp_path / "corrupt"
    shutil.copytree(small, corrupt)
    shard = sorted(corrupt.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    torch.multiprocessing.spawn(_main, args=(2, _free_port(), str(hf), str(small), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    for r in ranks:
        refused = r["refused"]
        assert refused[0].startswith(f"KroncFileError: {hf} is not a saved kronc model: kronc.json is missing"), refused[0]
        assert refused[1].startswith("KroncFileError: ") and "is corrupted: its SHA-256 does not match" in refused[1]
        assert refused[2].startswith("RecoveryError: ") and "is a non-empty folder that is not a kronc save" in refused[2]
        assert refused[3].startswith("RecoveryError: a student given as a save folder"), refused[3]
        assert all("\n" not in line for line in refused)
    assert not (tmp_path / "x").exists() and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    for r in ranks:  # a NaN stops both ranks together; nothing is written
        assert r["nan"].startswith("RecoveryError: the kd loss became nan at step 1"), r["nan"]
    assert not (tmp_path / "nan").exists() and not list(tmp_path.glob(".nan.kronc-tmp-*"))

    streamed, r0 = ranks[0]["streamed"], ranks[0]
    assert streamed["saved"] == str(tmp_path / "streamed") and streamed["steps"] == STEPS
    assert streamed["losses"] == r0["whole_losses"]
    recovered = kronc.load(tmp_path / "streamed")
    start = _weights(kronc.load(small))
    got = _weights(recovered)
    assert set(got) == set(r0["whole"])
    assert all(torch.equal(got[k], r0["whole"][k]) for k in got)  # bit-identical to the whole-student sharded run
    assert any(not torch.equal(got[k], start[k]) for k in got)  # and training moved it
    assert (r0["part"]["steps"], r0["resumed"]["steps"]) == (2, STEPS)
    resumed = _weights(kronc.load(tmp_path / "resumed"))
    assert all(torch.equal(resumed[k], got[k]) for k in got)  # a run and its resume: the same save, bit for bit
    manifest = json.loads((tmp_path / "streamed" / "kronc.json").read_text())
    assert len(manifest["weights"]["shards"]) == 3  # one per block, one for the rest, as the streamed compile writes

    whole = kronc.load(small)
    full_params = sum(p.numel() * p.element_size() for p in whole.parameters())
    full_buffers = sum(b.numel() * b.element_size() for b in whole.buffers())
    held = [r["streamed"]["held"] for r in ranks]
    assert all(h["meta"] == 0 for h in held)
    # the trained scales are fp32 parameters while recovery runs (absent from the whole model as loaded)
    scale_params = sum(b.numel() * 4 for n, b in whole.named_buffers() if n.endswith(".scales"))
    assert sum(h["params"] for h in held) == full_params + scale_params
    assert all(0.4 < h["params"] / (full_params + scale_params) < 0.6 for h in held), held
    assert all(h["buffers"] == full_buffers for h in held)  # buffers (int8 codes, fp16 scales) stay whole


def test_recovery_from_a_save_folder_needs_two_ranks(saved: tuple[Path, Path], tmp_path: Path) -> None:
    import torch.distributed as dist

    hf, small = saved
    teacher = _teacher(hf)
    with pytest.raises(RecoveryError, match=r"recovering a save folder shards the student over 2 or more ranks \(world size 1\)"):
        kronc.recover(str(small), teacher, _ids(), out=tmp_path / "a", **RUN)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with pytest.raises(RecoveryError, match=r"2 or more ranks \(world size 1\)") as e:
            kronc.recover(kronc.load(small, device="meta"), teacher, _ids(), out=tmp_path / "a", **RUN)
        assert "\n" not in str(e.value)
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "a").exists()


def test_load_on_the_meta_device(saved: tuple[Path, Path], tmp_path: Path) -> None:
    """The compressed structure with the stored shapes and dtypes, no storage; a shard that does not match is refused."""
    _, small = saved
    meta, whole = kronc.load(small, device="meta"), kronc.load(small)
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
    got = {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()}
    assert got == {k: (v.shape, v.dtype) for k, v in whole.state_dict().items()}
    assert [type(m) for m in meta.modules()] == [type(m) for m in whole.modules()]
    assert meta.kronc_folder == str(small)

    broken = tmp_path / "broken"
    shutil.copytree(small, broken)
    with pytest.raises(KroncFileError, match="is corrupted: its SHA-256 does not match the manifest"):
        (sorted(broken.glob("model-*.safetensors"))[0]).write_bytes(b"x" * 10)
        manifest = json.loads((broken / "kronc.json").read_text())
        manifest["weights"]["shards"][0]["bytes"] = 10
        (broken / "kronc.json").write_text(json.dumps(manifest))
        kronc.load(broken, device="meta")
    with pytest.raises(KroncFileError, match="device must be 'cpu' or 'meta'"):
        kronc.load(small, device="cuda:3")
