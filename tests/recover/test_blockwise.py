"""Block-wise reconstruction: blocks found per architecture, errors fall, resume is exact, a worse block keeps its
weights, the teacher is untouched, the end-to-end pass trains only norms and biases, bad input fails early."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import kronc
from kronc.policies import Policy
from kronc.recover import RecoveryConfig, RecoveryError, block_cache, block_fit, recover
from kronc.recover import blockwise as bw
from kronc.recover.blocks import find_blocks
from kronc.recover.blockwise import BlockwiseResult, reconstruct_blocks
from kronc.recover.losses import model_output, relative_mse
from kronc.recover.optim import parameter_roles
from kronc.tools.toy import TOY_MODELS, FunctionalMLP, toy_inputs, with_decaying_spectra

pytestmark = pytest.mark.slow  # block-wise recovery trains every block of a model: seconds per test

pytest.importorskip("transformers")

SMALL: dict[str, Any] = {"seq_len": 16, "batch_size": 4, "progress": False, "blockwise": {"samples": 16, "epochs": 8, "lr": 3e-3}}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compressed(name: str, budget: str = "10x") -> tuple[nn.Module, nn.Module]:
    """(dense teacher with trained-like spectra, compressed student)."""
    torch.manual_seed(0)
    teacher = with_decaying_spectra(TOY_MODELS[name]())
    return teacher, kronc.compile(teacher, policy=Policy(budget=budget))


def stream(n: int = 2000, seed: int = 1) -> Tensor:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))


def held_out() -> Tensor:
    return torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))


def output_error(student: nn.Module, teacher: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        return float(relative_mse(model_output(student(x))[0], model_output(teacher(x))[0]))


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- blocks


@pytest.mark.parametrize(("name", "container", "count"), [
    ("gpt2", "transformer.h", 2), ("llama", "model.layers", 2), ("bert", "encoder.layer", 2), ("lstm", "lstm", 2)])
def test_blocks_are_found_from_the_data_flow(name: str, container: str, count: int) -> None:
    teacher, student = compressed(name, "4x")
    chain = find_blocks(student, teacher, (toy_inputs(name),), {})
    assert chain.container == container
    assert len(chain.blocks) == count
    student_params = {id(p) for p in student.parameters()}
    teacher_params = {id(p) for p in teacher.parameters()}
    for block in chain.blocks:  # the student's blocks share the student's tensors, the teacher's the teacher's
        assert {id(p) for p in block.student.parameters()} <= student_params
        assert {id(p) for p in block.teacher.parameters()} <= teacher_params


def test_lstm_layer_views_reproduce_the_lstm() -> None:
    teacher, student = compressed("lstm", "4x")
    chain = find_blocks(student, teacher, (toy_inputs("lstm"),), {})
    x = teacher.embedding(toy_inputs("lstm")).detach()
    for model, side in ((student, "student"), (teacher, "teacher")):
        h = x
        for block in chain.blocks:
            h = getattr(block, side)(h)[0]
        torch.testing.assert_close(h, model.lstm(x)[0], rtol=1e-5, atol=1e-6)


def test_a_model_without_blocks_is_refused() -> None:
    mlp = FunctionalMLP().eval()
    with pytest.raises(RecoveryError, match="no block structure found in FunctionalMLP"):
        find_blocks(copy.deepcopy(mlp), mlp, (torch.randn(2, 32),), {})


# --------------------------------------------------------------------------- it works


@pytest.mark.parametrize(("name", "target"), [("llama", "both"), ("llama", "student_inputs"),
                                              ("llama", "teacher_stream"), ("lstm", "both")])
def test_blockwise_lowers_every_block_and_the_output_error(name: str, target: str) -> None:
    teacher, student = compressed(name)
    before, start = output_error(student, teacher, held_out()), state(student)
    result = reconstruct_blocks(student, teacher, stream(), **{**SMALL, "blockwise": {**SMALL["blockwise"], "target": target}})
    assert isinstance(result, BlockwiseResult) and len(result.blocks) == 3  # two blocks, then the tail
    assert result.blocks[-1].name.startswith("tail after ") and result.blocks[-1].params > 0
    embedding = [k for k in start if "embed" in k]  # before the first block: no gradient reaches it
    assert embedding and all(torch.equal(start[k], student.state_dict()[k]) for k in embedding)
    for b in result.blocks:
        assert not b.kept_initial, b
        assert b.loss_after < b.loss_before, b
        assert b.tokens == 8 * 16 * 16 and b.tokens_per_second > 0
    assert sum(b.loss_after / b.loss_before for b in result.blocks) / len(result.blocks) < 0.8
    assert output_error(student, teacher, held_out()) < 0.8 * before


def test_teacher_is_untouched_and_flags_are_put_back() -> None:
    teacher, student = compressed("llama")
    t_state = state(teacher)
    grads = [p.requires_grad for p in student.parameters()]
    reconstruct_blocks(student, teacher, stream(), **SMALL)
    assert same(state(teacher), t_state)
    assert [p.requires_grad for p in student.parameters()] == grads
    assert not teacher.training and not student.training


def test_recover_method_blockwise_with_an_end_to_end_pass_trains_only_norms_and_biases() -> None:
    teacher, plain = compressed("llama")
    both = copy.deepcopy(plain)
    reconstruct_blocks(plain, teacher, stream(), **SMALL)
    after_blocks = state(plain)
    cfg = RecoveryConfig(method="blockwise", seq_len=16, batch_size=4,
                         blockwise={**SMALL["blockwise"], "e2e_steps": 3, "e2e_lr": 1e-2})
    result = kronc.recover(both, teacher, stream(), cfg, progress=False)
    assert isinstance(result, BlockwiseResult) and len(result.history) == 3 and len(result.blocks) == 3
    roles = parameter_roles(both)
    now = dict(both.named_parameters())
    moved = {n for n, p in now.items() if not torch.equal(p, after_blocks[n])}
    assert moved and {roles[n] for n in moved} <= {"norm", "bias"}


# --------------------------------------------------------------------------- safety


def test_resume_after_an_interruption_gives_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, student = compressed("llama")
    other = copy.deepcopy(student)
    reconstruct_blocks(student, teacher, stream(), checkpoint_path=str(tmp_path / "a.pt"), **SMALL)

    real, calls = bw._block_loss, []
    per_block = 4 + 8 * 4 + 4  # loss calls per block: mean before, 8 epochs of 4 batches, mean after

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == per_block + 4 + 10:  # the second block is stopped after 9 of its training steps
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bw, "_block_loss", interrupted)
    path = str(tmp_path / "b.pt")
    with pytest.raises(KeyboardInterrupt):
        reconstruct_blocks(other, teacher, stream(), checkpoint_path=path, **SMALL)
    monkeypatch.setattr(bw, "_block_loss", real)
    assert len(torch.load(path, weights_only=True)["records"]) == 1
    assert not same(state(other), state(student))
    result = reconstruct_blocks(other, teacher, stream(), checkpoint_path=path, resume=True, **SMALL)
    assert [b.name for b in result.blocks] == ["model.layers.0", "model.layers.1", "tail after model.layers.1"]
    assert same(state(other), state(student))


def test_disk_cache_gives_the_same_weights_as_memory(tmp_path: Path) -> None:
    teacher, student = compressed("lstm")
    other = copy.deepcopy(student)
    reconstruct_blocks(student, teacher, stream(), **SMALL)
    on_disk = {**SMALL, "blockwise": {**SMALL["blockwise"], "cache": "disk", "cache_dir": str(tmp_path / "cache")}}
    reconstruct_blocks(other, teacher, stream(), **on_disk)
    assert same(state(other), state(student))
    assert any((tmp_path / "cache").iterdir())


def test_the_dense_target_becomes_the_next_teacher_stream_without_a_second_teacher_pass(
        monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, student = compressed("llama")
    other = copy.deepcopy(student)
    no_tail = {**SMALL, "blockwise": {**SMALL["blockwise"], "tail": False}}
    chain = find_blocks(student, teacher, (toy_inputs("llama"),), {})
    calls = {b.name: 0 for b in chain.blocks}
    hooks = [teacher.get_submodule(b.name).register_forward_hook(
        lambda *_, name=b.name: calls.__setitem__(name, calls[name] + 1)) for b in chain.blocks]
    try:
        reconstruct_blocks(student, teacher, stream(), **no_tail)
        reused = dict(calls)
        calls.update({k: 0 for k in calls})
        real = bw._propagate
        monkeypatch.setattr(bw, "_propagate", lambda block, cache, reuse_target=False: real(block, cache, False))
        reconstruct_blocks(other, teacher, stream(), **no_tail)
    finally:
        for h in hooks:
            h.remove()
    batches = 16 // 4
    # capture runs the teacher once per batch, each block's targets twice ("both"); propagating adds none
    assert all(reused[k] == calls[k] - batches for k in calls), (reused, calls)
    assert all(reused[k] <= 3 * batches for k in reused), reused
    assert same(state(other), state(student))  # the same teacher streams, so the same weights


def test_a_block_whose_loss_rises_keeps_its_weights() -> None:
    teacher, student = compressed("llama")
    before = state(student)
    huge = {**SMALL, "blockwise": {**SMALL["blockwise"], "lr": 10.0}, "grad_clip": 0.0}
    with pytest.warns(UserWarning, match="keeps its weights from before"):
        result = reconstruct_blocks(student, teacher, stream(), **huge)
    assert all(b.kept_initial and b.loss_after == b.loss_before for b in result.blocks)
    assert all(not b.loss_trained <= b.loss_before for b in result.blocks)  # higher, or NaN
    assert same(state(student), before)


# --------------------------------------------------------------------------- bad input


def test_bad_input_fails_before_training() -> None:
    teacher, student = compressed("llama")
    before = state(student)
    with pytest.raises(RecoveryError, match="fewer than seq_len"):
        reconstruct_blocks(student, teacher, stream(10), **SMALL)
    tight = {**SMALL, "blockwise": {**SMALL["blockwise"], "max_cache_gb": 1e-6}}
    with pytest.raises(RecoveryError, match="max_cache_gb=1e-06: set blockwise.cache='disk'"):
        reconstruct_blocks(student, teacher, stream(), **tight)
    with pytest.raises(RecoveryError, match="takes no schemes"):
        recover(student, teacher, stream(), method="blockwise", schemes=[object()], progress=False)
    with pytest.raises(RecoveryError, match="no block structure"):
        mlp = FunctionalMLP().eval()
        reconstruct_blocks(kronc.compile(mlp, policy=Policy(budget="2x")), mlp,
                           [torch.randn(4, 32)], progress=False, trainable="all")
    with pytest.raises(ValueError, match="blockwise.epochs"):
        RecoveryConfig(method="blockwise", blockwise={"epochs": 0})
    assert same(state(student), before)


def test_compress_recovers_block_wise_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kronc.tools.cli import EXIT_OK, main

    text = tmp_path / "text.txt"
    text.write_text("The council said on Tuesday that the new bridge over the river would open in March. " * 8)
    policy = tmp_path / "p.yaml"
    policy.write_text("budget: 10x\ndefault_formats: [{kind: lowrank}]\n"
                      "recovery: {seq_len: 16, batch_size: 4, blockwise: {samples: 8, epochs: 2}}\n")
    argv = ["compress", "toy:lstm", "--policy", str(policy), "-q", "--recover-text", str(text)]
    assert main([*argv, "--out", str(tmp_path / "rec"), "--recover-method", "blockwise"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "recovered on text.txt: block-wise reconstruction: 3 blocks" in out
    assert kronc.load(tmp_path / "rec").kronc_policy["recovery"]["method"] == "distill"  # the policy as given


# --------------------------------------------------------------------------- the tail's memory


def _estimate(caplog: pytest.LogCaptureFixture, vocab: int) -> float:
    from kronc.tools.toy import tiny_llama

    torch.manual_seed(0)
    teacher = with_decaying_spectra(tiny_llama(vocab=vocab))
    student = kronc.compile(teacher, policy=Policy(budget="4x"))
    caplog.clear()
    with caplog.at_level("INFO", logger="kronc.recover"):
        reconstruct_blocks(student, teacher, stream(), **{**SMALL, "blockwise": {**SMALL["blockwise"], "epochs": 1}})
    [message] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("block-wise cache")]
    return float(message.split(" = ")[1].split(" MiB")[0])


@pytest.mark.filterwarnings("ignore:block .* keeps its weights")
def test_the_cache_estimate_does_not_grow_with_the_vocabulary(caplog: pytest.LogCaptureFixture) -> None:
    small, large = _estimate(caplog, 128), _estimate(caplog, 8192)
    assert small > 0
    assert large == small  # the tail caches the teacher's final stream, not its 8192-wide logits


@pytest.mark.parametrize("name", ["llama", "lstm", "gpt2"])
def test_the_teachers_tail_on_its_final_stream_gives_its_output(name: str) -> None:
    from kronc.recover.batches import Batch
    from kronc.recover.tail import blocks_skipped

    teacher, student = compressed(name, "4x")
    x = toy_inputs(name)
    chain = find_blocks(student, teacher, (x,), {})
    with torch.no_grad():
        final = block_cache.teacher_final_stream(teacher, chain, Batch((x,), tokens=x.numel()), {})
        kinds: list[bool] = []
        handle = chain.blocks[-1].teacher.register_forward_hook(lambda m, a, out: kinds.append(isinstance(out, tuple)))
        expected = model_output(teacher(x))[0]
        handle.remove()
        tuple_output = kinds[-1] if kinds else True  # an LSTM layer view never runs inside the teacher
        with blocks_skipped(teacher, chain, tuple_output) as feed:
            feed.value = final
            got = model_output(teacher(x))[0]
    assert final.shape[:-1] == x.shape  # one hidden stream per position
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert same(state(teacher), state(compressed(name, "4x")[0]))  # put back as it was


def sibling_lstms() -> tuple[nn.Module, nn.Module]:
    """A small textgenrnn (two one-layer LSTMs, ``rnn_2`` reading ``rnn_1``, both read again by the attention
    pooling: a skip connection), dense, and its LSTMs compressed 4x."""
    from kronc.tools.models.textgenrnn import TextGenRNN

    torch.manual_seed(0)
    teacher = with_decaying_spectra(TextGenRNN(vocab_size=64, embed_dim=16, hidden=24)).eval()
    policy = Policy.model_validate({"budget": "4x", "scope": {"kinds": ["lstm"]}})
    return teacher, kronc.compile(teacher, policy=policy, example_inputs=(torch.zeros(1, 12, dtype=torch.long),))


def test_sibling_lstms_that_feed_one_another_are_one_chain_and_the_tail_keeps_their_skip_connections() -> None:
    from kronc.recover.batches import Batch
    from kronc.recover.tail import blocks_skipped

    teacher, student = sibling_lstms()
    x = torch.randint(1, 64, (3, 12), generator=torch.Generator().manual_seed(4))
    chain = find_blocks(student, teacher, (x,), {})
    assert [b.name for b in chain.blocks] == ["rnn_1[layer 0]", "rnn_2[layer 0]"]  # both LSTMs, in stream order
    assert chain.recurrent == ["rnn_1", "rnn_2"]
    with torch.no_grad():
        h = student.embedding(x)
        for block in chain.blocks:  # the layer views chained give the student's last LSTM output
            h = block.student(h)[0]
        torch.testing.assert_close(h, student.rnn_2(student.rnn_1(student.embedding(x))[0])[0], rtol=1e-5, atol=1e-6)
        for model, stream_ in ((student, h), (teacher, block_cache.teacher_final_stream(teacher, chain,
                                                                                      Batch((x,), tokens=x.numel()), {}))):
            expected = model(x)
            with blocks_skipped(model, chain, True) as feed:  # the tail's pass: the cached final stream fed in
                feed.value = stream_
                got = model(x)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # rnn_1's output still reaches the pooling


def test_block_wise_reconstruction_of_sibling_lstms_lowers_the_output_error() -> None:
    teacher, student = sibling_lstms()
    data = torch.randint(1, 64, (2000,), generator=torch.Generator().manual_seed(1))
    held = torch.randint(1, 64, (8, 12), generator=torch.Generator().manual_seed(2))
    before = output_error(student, teacher, held)
    result = recover(student, teacher, data, method="blockwise", seq_len=12, batch_size=4, progress=False,
                     blockwise={"samples": 16, "epochs": 8, "lr": 3e-3})
    assert [b.name for b in result.blocks][:2] == ["rnn_1[layer 0]", "rnn_2[layer 0]"]
    assert all(b.loss_after <= b.loss_before for b in result.blocks)
    assert output_error(student, teacher, held) < before


# --------------------------------------------------------------------------- time budget


def test_a_time_budget_stops_every_block_and_no_budget_runs_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock that moves one second per loss evaluation: the phase must end near its budget."""
    teacher, student = compressed("llama")
    untimed = copy.deepcopy(student)
    full = reconstruct_blocks(untimed, teacher, stream(), **SMALL)
    assert all(b.steps == 8 * 4 and not b.timed_out for b in full.blocks)  # 8 epochs of 4 batches, every block

    clock = [0.0]
    fake = type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])})
    monkeypatch.setattr(bw, "time", fake)
    monkeypatch.setattr(block_fit, "time", fake)
    for name in ("relative_mse", "kl_loss"):
        real = getattr(bw, name)

        def ticking(*args: Any, _real: Any = real, **kwargs: Any) -> Tensor:
            clock[0] += 1.0
            return _real(*args, **kwargs)

        monkeypatch.setattr(bw, name, ticking)
    budget = 60.0
    timed = reconstruct_blocks(student, teacher, stream(), **{**SMALL, "blockwise": {**SMALL["blockwise"], "max_seconds": budget}})
    assert [b.name for b in timed.blocks] == [b.name for b in full.blocks]
    assert all(b.timed_out and 0 < b.steps < 8 * 4 for b in timed.blocks), timed.blocks
    assert all(b.tokens == b.steps * 4 * 16 for b in timed.blocks)
    # the last step may start just before its block's share ends, then the loss after it is measured: one
    # block's evaluation (4 batches, 2 losses each for target="both") past the budget at most
    assert clock[0] <= budget + 2 * 4 + 2
    assert "cut short by max_seconds" in str(timed)
