"""Streamed compile (`kronc.scale.stream`) against the in-memory compile, sharded saves, bad checkpoints,
and the same compile split over two gloo ranks."""

from __future__ import annotations

import datetime
import functools
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch

import kronc
from kronc.inputs import InputError
from kronc.serialize import KroncFileError
from kronc.serialize.shards import CheckpointError

transformers = pytest.importorskip("transformers")

BUDGET = "4x"


def _config() -> object:
    return transformers.LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)


def _calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(4)]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved by transformers in several safetensors shards (random init, no download)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    transformers.LlamaForCausalLM(_config()).eval().save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


@pytest.fixture(scope="module")
def in_memory(hf_folder: Path) -> torch.nn.Module:
    model = transformers.LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    return kronc.compile(model, budget=BUDGET, calibration=_calibration())


@pytest.fixture(scope="module")
def streamed(hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("stream") / "small"
    path, report = kronc.compile(str(hf_folder), budget=BUDGET, calibration=_calibration(), stream=True, out=out, report=True)
    return path, report


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.mark.slow
def test_streamed_compile_matches_in_memory(streamed: tuple[Path, object], in_memory: torch.nn.Module) -> None:
    path, report = streamed
    loaded = kronc.load(path)
    assert loaded.kronc_plan == in_memory.kronc_plan  # same decisions, sizes and estimated errors
    assert in_memory.kronc_plan.objective == "data"
    assert any(not d.spec.identity for d in in_memory.kronc_plan.decisions)
    _same_weights(loaded, in_memory)
    ids = torch.randint(0, 128, (1, 12))
    assert torch.equal(loaded(ids).logits, in_memory(ids).logits)
    manifest = json.loads((path / "kronc.json").read_text())
    assert len(manifest["weights"]["shards"]) == 4  # three blocks and the rest
    assert report.output == "save folder"  # type: ignore[attr-defined]


@pytest.mark.slow
def test_streamed_sensitivity_equals_in_memory(hf_folder: Path, tmp_path: Path) -> None:
    """The backward sweep gives collect_sensitivity's numbers (the planner's importance) exactly."""
    from kronc.api import make_policy, sensitivity
    from kronc.capture import capture
    from kronc.scale.stream import compile_streamed

    cal = _calibration()
    pol = make_policy(None, BUDGET, cal)
    result = compile_streamed(hf_folder, pol, tmp_path / "s", calibration=cal, log=lambda _: None)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    expected = sensitivity(capture(model), pol, cal)
    assert result.importance is not None and expected is not None
    assert result.importance == expected
    assert "estimated peak memory" in result.estimate.describe()


@pytest.mark.slow
def test_streamed_without_calibration_and_offloaded(hf_folder: Path, tmp_path: Path) -> None:
    model = transformers.LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    small = kronc.compile(model, budget="6x")
    path = kronc.compile(str(hf_folder), budget="6x", stream=True, out=tmp_path / "w", offload_activations=tmp_path / "acts")
    loaded = kronc.load(path)
    assert loaded.kronc_plan == small.kronc_plan and loaded.kronc_plan.objective == "weight"
    _same_weights(loaded, small)
    assert list((tmp_path / "acts").iterdir()) == []  # offloaded activations are cleaned up


@pytest.mark.slow
def test_offloaded_activations_give_the_same_model(hf_folder: Path, streamed: tuple[Path, object], tmp_path: Path) -> None:
    path = kronc.compile(str(hf_folder), budget=BUDGET, calibration=_calibration(), stream=True, out=tmp_path / "o",
                         offload_activations=tmp_path / "acts")
    _same_weights(kronc.load(path), kronc.load(streamed[0]))


@pytest.mark.slow
def test_streamed_gpt2_matches_in_memory(tmp_path: Path) -> None:
    """GPT-2: transposed Conv1D weights, blocks that return tuples, an LM head tied to the embedding."""
    from kronc.tools.toy import tiny_gpt2

    torch.manual_seed(0)
    tiny_gpt2(layers=2, width=64).save_pretrained(tmp_path / "gpt2", max_shard_size="60KB")
    cal = _calibration()[:3]
    path = kronc.compile(str(tmp_path / "gpt2"), budget=BUDGET, calibration=cal, stream=True, out=tmp_path / "out")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2", dtype=torch.float32).eval()
    small = kronc.compile(model, budget=BUDGET, calibration=cal)
    loaded = kronc.load(path)
    assert loaded.kronc_plan == small.kronc_plan
    _same_weights(loaded, small)


# ----------------------------------------------------------------------------------------- bad input


def _copy(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


def test_missing_shard_fails_before_work(hf_folder: Path, tmp_path: Path) -> None:
    bad = _copy(hf_folder, tmp_path)
    victim = sorted(bad.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name} is missing") as e:
        kronc.compile(str(bad), budget=BUDGET, stream=True, out=tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.kronc-tmp-*"))


def test_mismatched_shard_names_the_tensor(hf_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = _copy(hf_folder, tmp_path)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.up_proj.weight"
    file = bad / index[name]
    tensors = load_file(str(file))
    tensors[name] = torch.zeros(96, 64)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} is \[96, 64\] but the config makes it \[128, 64\]"):
        kronc.compile(str(bad), budget=BUDGET, stream=True, out=tmp_path / "out")


def test_folder_without_config(hf_folder: Path, tmp_path: Path) -> None:
    bad = _copy(hf_folder, tmp_path)
    (bad / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        kronc.compile(str(bad), budget=BUDGET, stream=True, out=tmp_path / "out")


def test_model_class_that_cannot_be_built_fails_before_work(hf_folder: Path, tmp_path: Path) -> None:
    """A config naming a model type transformers cannot build: one line, before any work, nothing written."""
    bad = _copy(hf_folder, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "no_such_model_type"}))
    with pytest.raises(CheckpointError, match=r"config.json cannot be read: .*no_such_model_type") as info:
        kronc.compile(str(bad), budget=BUDGET, stream=True, out=tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_max_memory_refuses_naming_the_largest_part(hf_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"exceeds the maximum 100.00 kB; the largest part is [a-z ]+ \(.*\): "):
        kronc.compile(str(hf_folder), budget=BUDGET, calibration=_calibration(), stream=True, out=tmp_path / "out",
                      max_memory="100kB")
    with pytest.raises(InputError, match="not a size"):
        kronc.compile(str(hf_folder), budget=BUDGET, stream=True, out=tmp_path / "out", max_memory="lots")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.kronc-tmp-*"))


def test_truncated_shard_of_a_save(streamed: tuple[Path, object], tmp_path: Path) -> None:
    save = tmp_path / "save"
    shutil.copytree(streamed[0], save)
    shard = sorted(save.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(KroncFileError, match=f"{shard.name} is truncated"):
        kronc.load(save)


# ----------------------------------------------------------------------------------------- two ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, folder: str, out: str, results: str, sabotage: bool) -> None:
    import torch.distributed as dist

    from kronc.api import make_policy
    from kronc.scale.stream import compile_streamed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cal = _calibration()
        source = folder if not (sabotage and rank == 1) else folder + "-nowhere"
        try:
            result = compile_streamed(source, make_policy(None, BUDGET, cal), out, calibration=cal, log=lambda _: None)
            message = f"ok {result.path}"
        except Exception as e:  # noqa: BLE001 - the test reads each rank's outcome
            message = f"{type(e).__name__}: {e}"
        Path(results, f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def _spawn(hf_folder: Path, out: Path, results: Path, sabotage: bool) -> list[str]:
    results.mkdir()
    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), str(hf_folder), str(out), str(results), sabotage),
                                nprocs=2, join=True)
    return [(results / f"rank{r}.txt").read_text() for r in range(2)]


@pytest.mark.slow
def test_two_gloo_ranks_give_the_one_process_model(hf_folder: Path, streamed: tuple[Path, object], tmp_path: Path) -> None:
    outcomes = _spawn(hf_folder, tmp_path / "two", tmp_path / "results", sabotage=False)
    assert all(o.startswith("ok") for o in outcomes), outcomes
    two, one = kronc.load(tmp_path / "two"), kronc.load(streamed[0])
    assert two.kronc_plan == one.kronc_plan
    _same_weights(two, one)


@pytest.mark.slow
def test_a_failing_rank_stops_the_job(hf_folder: Path, tmp_path: Path) -> None:
    outcomes = _spawn(hf_folder, tmp_path / "two", tmp_path / "results", sabotage=True)
    assert outcomes[1].startswith("CheckpointError") and "nowhere does not exist" in outcomes[1]
    assert outcomes[0].startswith("RankFailed: rank 1 of 2 failed: CheckpointError"), outcomes[0]
    assert not (tmp_path / "two").exists() and not list(tmp_path.glob(".two.kronc-tmp-*"))


@pytest.mark.slow
def test_cli_compress_stream(hf_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kronc.tools.cli import EXIT_INPUT, EXIT_OK, main

    out = tmp_path / "small"
    assert main(["compress", str(hf_folder), "--stream", "--budget", "6x", "--out", str(out), "-q"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "estimated peak memory" in printed and "in 4 shards" in printed
    model = transformers.LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    _same_weights(kronc.load(out), kronc.compile(model, budget="6x"))
    assert main(["compress", str(hf_folder), "--stream", "--budget", "6x", "--out", str(tmp_path / "x"), "-q",
                 "--max-memory", "1kB"]) == EXIT_INPUT
    assert "exceeds the maximum 1.00 kB" in capsys.readouterr().err
    assert main(["compress", "toy:llama", "--budget", "6x", "--out", str(tmp_path / "y"), "--max-memory", "1GB"]) == EXIT_INPUT


# ----------------------------------------------------------------------------------------- data-parallel recovery


def _recovery_case(batch_size: int) -> dict[str, torch.Tensor]:
    """A compressed toy Llama distilled for a few steps; returns the student's weights and (as ``"losses"``) the
    logged loss of every step."""
    from kronc.tools.toy import tiny_llama

    torch.manual_seed(0)
    teacher = tiny_llama(layers=2, width=32)
    student = kronc.compile(teacher, budget="3x")
    ids = torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(2))
    result = kronc.recover(student, teacher, ids, steps=3, lr=1e-3, seq_len=16, batch_size=batch_size, hidden=0.0,
                           progress=False)
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return {**state, "losses": torch.tensor([r.loss for r in result.history], dtype=torch.float64)}


def _recover_main(rank: int, world: int, port: int, results: str) -> None:
    import torch.distributed as dist

    from kronc.recover import RecoveryError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        try:
            _recovery_case(3)
        except RecoveryError as e:
            Path(results, f"rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        torch.save(_recovery_case(4), Path(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _failing_step_main(rank: int, world: int, port: int, results: str) -> None:
    """Rank 1 raises in the second recovery step's forward; every rank writes what it raised."""
    import torch.distributed as dist

    from kronc.recover.losses import Distiller

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    calls = [0]
    losses = Distiller.losses

    def broken(self: Distiller, batch: object) -> dict[str, torch.Tensor]:
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            raise ValueError("sabotaged forward on rank 1")
        return losses(self, batch)  # type: ignore[arg-type]

    Distiller.losses = broken  # type: ignore[method-assign]
    try:
        _recovery_case(4)
        Path(results, f"rank{rank}.txt").write_text("finished")
    except Exception as e:
        Path(results, f"rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_rank_failing_inside_a_recovery_step_stops_every_rank(tmp_path: Path) -> None:
    """The failing rank raises its error; the other raises RankFailed with its message at the same step
    (not a wait in the step's all_reduce until the backend's timeout)."""
    torch.multiprocessing.spawn(_failing_step_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank1.txt").read_text() == "ValueError: sabotaged forward on rank 1"
    assert (tmp_path / "rank0.txt").read_text() == "RankFailed: rank 1 of 2 failed: ValueError: sabotaged forward on rank 1"


def _untrained() -> dict[str, torch.Tensor]:
    from kronc.tools.toy import tiny_llama

    torch.manual_seed(0)
    return kronc.compile(tiny_llama(layers=2, width=32), budget="3x").state_dict()


@pytest.mark.slow
def test_data_parallel_recovery_matches_one_process(tmp_path: Path) -> None:
    """Two ranks, each on half of every batch with averaged gradients, take the one-process steps (up to the
    order of float sums, which AdamW's normalisation amplifies for near-zero gradients: compared on the
    whole update: 1.9% here); a batch of 3 rows over 2 ranks is refused on both before training."""
    torch.multiprocessing.spawn(_recover_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        assert "3 rows, which do not split evenly over 2 ranks" in (tmp_path / f"rank{r}.txt").read_text()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one, start = _recovery_case(4), _untrained()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in one)  # every rank applies the same averaged step
    torch.testing.assert_close(ranks[0]["losses"][0], one["losses"][0], rtol=1e-6, atol=0)  # same first step
    keys = [k for k in start if one[k].is_floating_point()]
    update = torch.cat([(one[k] - start[k]).reshape(-1).double() for k in keys])
    apart = torch.cat([(ranks[0][k] - one[k]).reshape(-1).double() for k in keys])
    assert update.norm() > 0, "recovery changed nothing: the comparison would be vacuous"
    assert apart.norm() / update.norm() < 5e-2, float(apart.norm() / update.norm())


@functools.cache
def _blockwise_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    from kronc.tools.toy import tiny_llama

    torch.manual_seed(0)
    teacher = tiny_llama(layers=2, width=32)
    return teacher, kronc.compile(teacher, budget="3x")


def _blockwise_case(batch_size: int, checkpoint: str | None = None, **blockwise: object) -> dict[str, torch.Tensor]:
    """The same compressed toy Llama reconstructed block by block (2 batches, 2 epochs, the tail and 2 end-to-end
    steps); returns the student's weights, each block's loss before training and whether it kept its weights."""
    import copy

    teacher, student = copy.deepcopy(_blockwise_models())  # compiled once per process: the test's time is spawns
    ids = torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(2))
    result = kronc.recover(student, teacher, ids, method="blockwise", seq_len=16, batch_size=batch_size, hidden=0.0,
                           checkpoint_path=checkpoint, progress=False,
                           blockwise={"samples": 8, "epochs": 2, "lr": 1e-2, "e2e_steps": 2, **blockwise})
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return {**state, "before": torch.tensor([b.loss_before for b in result.blocks], dtype=torch.float64),
            "trained": torch.tensor([b.loss_trained for b in result.blocks], dtype=torch.float64),
            "kept": torch.tensor([b.kept_initial for b in result.blocks])}


def _blockwise_main(rank: int, world: int, port: int, results: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on shared cores: more threads made this test 10x slower
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        outcomes = []
        for case in ({"batch_size": 3}, {"batch_size": 4, "max_cache_gb": 1e-9 if rank == 1 else 4.0}):
            try:
                _blockwise_case(**case)  # type: ignore[arg-type]
                outcomes.append("ok")
            except Exception as e:  # noqa: BLE001 - the test reads each rank's outcome
                outcomes.append(f"{type(e).__name__}: {e}")
        Path(results, f"rank{rank}.txt").write_text("\n".join(outcomes))
        torch.save(_blockwise_case(4, str(Path(results, "blocks.ckpt"))), Path(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_blockwise_matches_one_process(tmp_path: Path) -> None:
    """Two ranks reconstruct the blocks on half of every calibration batch each: the same weights on both, the
    one-process loss of every block before training and the same keep-or-revert decisions (at lr 1e-2 both
    blocks revert and the tail keeps its training, so no block's inputs carry the other run's float drift);
    3 rows per batch are refused on both ranks before any work, and a rank failing in its capture stops the other."""
    torch.multiprocessing.spawn(_blockwise_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2)]
    for r in range(2):
        assert outcomes[r][0] == ("RecoveryError: calibration batch 0 has 3 rows, which do not split evenly over 2 "
                                  "ranks: use a batch_size that is a multiple of 2 (data-parallel recovery gives each "
                                  "rank an equal slice)"), outcomes[r][0]
    assert outcomes[1][1].startswith("RecoveryError: the block-wise cache needs"), outcomes[1][1]
    assert outcomes[0][1].startswith("RankFailed: rank 1 of 2 failed: RecoveryError: the block-wise cache"), outcomes[0][1]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one, start = _blockwise_case(4), _untrained()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in one)  # every rank applies the same averaged steps
    assert len(one["before"]) == 3  # two blocks and the tail
    torch.testing.assert_close(ranks[0]["before"], one["before"], rtol=1e-6, atol=0)  # reverted blocks: no drift
    # the losses training reached: the same steps up to float summation order, which AdamW amplifies (1.8e-3 here)
    torch.testing.assert_close(ranks[0]["trained"], one["trained"], rtol=1e-2, atol=0)
    assert torch.equal(ranks[0]["kept"], one["kept"])
    assert one["kept"].any() and not one["kept"].all(), one["kept"]  # both decisions occur
    assert (tmp_path / "blocks.ckpt").is_file()  # written by rank 0 after every block
    keys = [k for k in start if one[k].is_floating_point()]
    update = torch.cat([(one[k] - start[k]).reshape(-1).double() for k in keys])
    apart = torch.cat([(ranks[0][k] - one[k]).reshape(-1).double() for k in keys])
    assert update.norm() > 0, "reconstruction changed nothing: the comparison would be vacuous"
    assert apart.norm() / update.norm() < 5e-2, float(apart.norm() / update.norm())
