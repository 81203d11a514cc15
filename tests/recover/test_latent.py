"""Block-AP (``blockwise.quantized="latent"``): latent weights train through fake quantization with a straight-
through estimator beside the scales, and are re-encoded into the same packed codes (same precision, same bytes);
the block's loss falls, a reverted block keeps its codes, and a resumed run gives the same weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import kronc
from kronc.recover import blockwise as bw
from kronc.recover.blockwise import reconstruct_blocks
from kronc.recover.optim import parameter_roles
from kronc.reference.pack import pack, unpack
from kronc.tools.toy import TOY_MODELS, with_decaying_spectra
from kronc.values import Precision, QuantizedTensor
from kronc.values.codec import decode_parts
from kronc.values.grid import level_range

pytest.importorskip("transformers")


def neighbour_target(q: QuantizedTensor, seed: int = 1) -> Tensor:
    """A weight on ``q``'s own grid (same scales and minima) whose levels differ from ``q``'s by -1, 0 or +1."""
    p = q.precision
    lo, hi = level_range(p)
    rows, inn = p.check_shape(q.shape)
    g = torch.Generator().manual_seed(seed)
    levels = (unpack(q.codes, p.bits, lo, inn) + torch.randint(-1, 2, (rows, inn), generator=g)).clamp(lo, hi)
    return decode_parts(pack(levels, p.bits, lo), q.scales, q.minima, p, q.shape)


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_quantized_linear_reaches_an_exactly_representable_target_and_re_encodes_exactly(symmetric: bool) -> None:
    torch.manual_seed(0)
    p = Precision(dtype="int3", group_size=16, symmetric=symmetric)
    q = QuantizedTensor.from_float(torch.randn(8, 64), p)
    nbytes, target, x = q.nbytes(), neighbour_target(q), torch.randn(256, 64)
    assert not torch.equal(q.dequantize(), target)
    y = x @ target.T
    params = q.train_latent()
    latent = q.latent_train
    assert params[-1] is latent and latent.shape == (8, 4, 16)
    opt = torch.optim.Adam([latent], lr=0.05)  # the scales stay: the target is on their grid
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 200)  # as the blocks' schedule: Adam settles
    for _ in range(200):
        opt.zero_grad()
        loss = (q.linear(x) - y).square().mean()
        loss.backward()
        opt.step()
        decay.step()
    assert float(loss.detach()) < 1e-10
    q.commit_latent()
    assert not q.trains_latent and q.trains_scales  # the scales keep training (from the identity on the new ones)
    assert torch.equal(q.dequantize(), target)
    assert q.nbytes() == nbytes == p.nbytes((8, 64)) and q.precision == p
    q.commit_scales()
    assert torch.equal(q.dequantize(), target) and not list(q.parameters())


@pytest.mark.parametrize(("dtype", "group", "symmetric"), [("int2", 16, False), ("int3", 32, True), ("int4", 32, False),
                                                            ("int8", None, True)])
def test_re_encoding_keeps_bytes_and_precision_and_decodes_to_what_the_forward_used(dtype: str, group: int | None,
                                                                                 symmetric: bool) -> None:
    torch.manual_seed(0)
    p = Precision(dtype=dtype, group_size=group, symmetric=symmetric)  # type: ignore[arg-type]
    q = QuantizedTensor.from_float(torch.randn(6, 64), p)
    codes, nbytes, before = q.codes.clone(), q.nbytes(), q.dequantize()
    q.train_latent()
    assert torch.equal(q.dequantize(), before)  # the latent weights start on the stored levels
    with torch.no_grad():  # move the latent weights (some far out of range: they clamp) and the grid
        q.latent_train.add_(3 * torch.randn_like(q.latent_train))
        q.scales_train.mul_(1.1)
        if "minima_train" in q._parameters:
            q.minima_train.add_(0.3)
    used = q.dequantize().detach()
    q.commit_latent()
    assert q.codes.dtype == codes.dtype and q.codes.shape == codes.shape and not torch.equal(q.codes, codes)
    assert q.nbytes() == nbytes and q.precision == p
    assert torch.equal(q.dequantize(), used)
    q.commit_scales()
    assert torch.equal(q.dequantize(), used)


def test_the_scales_and_minima_receive_gradients_and_the_codes_move() -> None:
    torch.manual_seed(0)
    q = QuantizedTensor.from_float(torch.randn(8, 64), Precision(dtype="int2", group_size=16, symmetric=False))
    q.train_latent()
    roles = parameter_roles(nn.ModuleDict({"q": q}))
    assert roles == {"q.scales_train": "scale", "q.minima_train": "scale", "q.latent_train": "latent"}
    x = torch.randn(32, 64)
    (q.linear(x) - x @ torch.randn(8, 64).T).square().mean().backward()
    for p in q.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_without_gradients_the_linear_uses_the_trained_scales() -> None:
    torch.manual_seed(0)
    q = QuantizedTensor.from_float(torch.randn(8, 64), Precision(dtype="int4", group_size=32))
    q.train_scales()
    with torch.no_grad():
        q.scales_train.mul_(2.0)
    x = torch.randn(3, 64)
    with torch.no_grad():
        evaluated = q.linear(x)  # the block's loss checks and propagation run without gradients
    torch.testing.assert_close(evaluated, q.linear(x).detach())
    torch.testing.assert_close(evaluated, x @ q.dequantize().detach().T)


# --------------------------------------------------------------------------- blocks (seconds each)

RUN: dict[str, Any] = {"seq_len": 16, "batch_size": 4, "progress": False,
                       "blockwise": {"samples": 16, "epochs": 6, "lr": 3e-3, "latent_lr": 0.02,
                                     "quantized": "latent"}}  # opt-in (the default trains scales only)


def quantized_student() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = with_decaying_spectra(TOY_MODELS["llama"]())
    return teacher, kronc.compile(teacher, policy="int4-kernels", budget="5x")


def stream() -> Tensor:
    return torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(1))


def quantized_tensors(model: nn.Module) -> dict[str, QuantizedTensor]:
    return {n: q for n, q in model.named_modules() if isinstance(q, QuantizedTensor) and not q.precision.is_float}


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_block_ap_moves_codes_within_the_budget_and_beats_the_untrained_block() -> None:
    teacher, student = quantized_student()
    quant = quantized_tensors(student)
    codes = {n: q.codes.clone() for n, q in quant.items()}
    nbytes = {n: (q.nbytes(), q.precision) for n, q in quant.items()}
    result = reconstruct_blocks(student, teacher, stream(), **RUN)
    blocks = [b for b in result.blocks if not b.name.startswith("tail")]
    assert blocks and all(not b.kept_initial and b.loss_after < 0.9 * b.loss_before for b in blocks), result.blocks
    assert [n for n, q in quant.items() if not torch.equal(q.codes, codes[n])]  # codes re-encoded
    assert {n: (q.nbytes(), q.precision) for n, q in quant.items()} == nbytes
    assert not [k for k in student.state_dict() if k.endswith("_train")]
    assert not any(q.trains_latent or q.trains_scales for q in quant.values())


@pytest.mark.slow
def test_block_ap_reaches_a_lower_block_loss_than_frozen_codes() -> None:
    teacher, student = quantized_student()
    frozen = copy.deepcopy(student)
    latent = reconstruct_blocks(student, teacher, stream(), **RUN)
    scales = reconstruct_blocks(frozen, teacher, stream(), **{**RUN, "blockwise": {**RUN["blockwise"],
                                                                                  "quantized": "scales"}})
    first_latent, first_scales = latent.blocks[0], scales.blocks[0]
    assert first_latent.loss_before == first_scales.loss_before
    assert first_latent.loss_after < first_scales.loss_after


@pytest.mark.slow
def test_a_reverted_block_keeps_its_codes_and_scales() -> None:
    teacher, student = quantized_student()
    before = state(student)
    huge = {**RUN, "blockwise": {**RUN["blockwise"], "lr": 10.0, "latent_lr": 50.0, "tail": False}, "grad_clip": 0.0}
    with pytest.warns(UserWarning, match="keeps its weights from before"):
        result = reconstruct_blocks(student, teacher, stream(), **huge)
    assert all(b.kept_initial for b in result.blocks)
    after = state(student)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.slow
def test_resume_after_an_interruption_gives_the_same_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, student = quantized_student()
    other = copy.deepcopy(student)
    reconstruct_blocks(student, teacher, stream(), checkpoint_path=str(tmp_path / "a.pt"), **RUN)
    real, calls = bw._block_loss, []
    per_block = 4 + 6 * 4 + 4  # loss calls per block: mean before, 6 epochs of 4 batches, mean after

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == per_block + 4 + 10:  # inside the second block's training
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bw, "_block_loss", interrupted)
    path = str(tmp_path / "b.pt")
    with pytest.raises(KeyboardInterrupt):
        reconstruct_blocks(other, teacher, stream(), checkpoint_path=path, **RUN)
    monkeypatch.setattr(bw, "_block_loss", real)
    assert not any(q.trains_latent for q in quantized_tensors(other).values())  # dropped on the way out
    reconstruct_blocks(other, teacher, stream(), checkpoint_path=path, resume=True, **RUN)
    mine, theirs = state(student), state(other)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_latent_weights_of_a_rotated_precision_decode_in_the_weight_basis() -> None:
    """A rotated precision stores the levels of ``W R``; its latent weights train in that basis, and the
    tensor they give (what ``linear`` multiplies) is un-rotated like every other decode: before any step it
    equals the stored tensor's decode, and after a commit the stored codes decode to the trained tensor."""
    from kronc.values import Precision, QuantizedTensor

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q = QuantizedTensor.from_float(w, Precision(dtype="int3", group_size=32, symmetric=False, rotate=True))
    stored = q.dequantize()
    q.train_latent()
    torch.testing.assert_close(q.dequantize(), stored, rtol=0, atol=1e-5)
    x = torch.randn(5, 64)
    torch.testing.assert_close(q.linear(x), x @ stored.T, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        q.latent_train.add_(torch.randn_like(q.latent_train) * 0.7)
    trained = q.dequantize().detach()
    q.commit_scales()
    torch.testing.assert_close(q.dequantize(), trained, rtol=0, atol=1e-3)
