"""Quantization scales train in recovery (`kronc.recover.scales`): integer codes stay, fp16 scales and zero
points move, the block loss goes down, and what trained is what save/load gives back, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

import kronc
from kronc.formats import Kronecker, KroneckerSpec
from kronc.formats.training import dense_training
from kronc.modules import CompressedLinear
from kronc.recover.blockwise import reconstruct_blocks
from kronc.recover.optim import parameter_roles, trainable_parameters
from kronc.recover.scales import scales_trained
from kronc.tools.toy import TOY_MODELS, toy_inputs, with_decaying_spectra
from kronc.values import Precision, QuantizedTensor

pytest.importorskip("transformers")


def quantized(t: Tensor, p: Precision) -> QuantizedTensor:
    return QuantizedTensor.from_float(t, p)


@pytest.mark.parametrize("symmetric", [True, False])
def test_scales_train_with_frozen_codes_and_commit_exactly(symmetric: bool) -> None:
    torch.manual_seed(0)
    q = quantized(torch.randn(8, 64), Precision(dtype="int4", group_size=32, symmetric=symmetric))
    codes, scales = q.codes.clone(), q.scales.clone()
    before = q.dequantize()
    params = q.train_scales()
    assert len(params) == (1 if symmetric else 2) and all(p.dtype == torch.float32 for p in params)
    assert q.train_scales() == []  # already training: nothing new
    torch.testing.assert_close(q.dequantize(), before, rtol=0, atol=0)  # fp16 values, fp32 parameters
    target = torch.randn(8, 64)
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        (q.dequantize() - target).square().mean().backward()
        opt.step()
    trained = q.dequantize().detach()
    q.commit_scales()
    assert not q.trains_scales and not list(q.parameters())
    assert torch.equal(q.codes, codes) and q.scales.dtype == torch.float16 and not torch.equal(q.scales, scales)
    assert torch.equal(q.dequantize(), trained)  # the forward saw the fp16-rounded scales all along
    assert q.nbytes() == q.precision.nbytes((8, 64))


def test_a_quantized_factor_trains_its_scales_through_both_training_paths() -> None:
    torch.manual_seed(0)
    spec = KroneckerSpec(a_shape=(4, 4), terms=2, precision=Precision(dtype="int8"))
    layer = CompressedLinear(Kronecker.fit(torch.randn(16, 32), spec))
    x = torch.randn(64, 32)
    grads = []
    with scales_trained(layer):
        roles = parameter_roles(layer)
        assert set(roles.values()) == {"scale"}
        assert set(trainable_parameters(layer, "scales+norms+biases")) == set(roles)
        assert set(trainable_parameters(layer, "norms+biases")) == set()
        for mode in ("never", "always"):
            layer.zero_grad()
            with dense_training(mode):
                layer(x).square().sum().backward()
            grads.append([p.grad.clone() for p in layer.parameters()])
    assert not list(layer.parameters())  # back to buffers
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert a.abs().sum() > 0


def test_blockwise_recovery_moves_the_scales_lowers_the_loss_and_saves_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = with_decaying_spectra(TOY_MODELS["llama"]())
    student = kronc.compile(teacher, policy="int4-kernels", budget="5x")
    quant = {n: q for n, q in student.named_modules() if isinstance(q, QuantizedTensor) and not q.precision.is_float}
    assert quant
    codes = {n: q.codes.clone() for n, q in quant.items()}
    scales = {n: q.scales.clone() for n, q in quant.items()}
    nbytes = {n: q.nbytes() for n, q in quant.items()}
    result = reconstruct_blocks(student, teacher, torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(1)),
                                seq_len=16, batch_size=4, progress=False, trainable="scales+norms+biases",
                                blockwise={"samples": 16, "epochs": 6, "lr": 3e-3})
    blocks = [b for b in result.blocks if not b.name.startswith("tail")]
    assert blocks and all(not b.kept_initial and b.loss_after < b.loss_before for b in blocks), result.blocks
    assert all(torch.equal(q.codes, codes[n]) for n, q in quant.items())  # the codes are frozen
    moved = [n for n, q in quant.items() if not torch.equal(q.scales, scales[n])]
    assert moved and all(q.scales.dtype == torch.float16 for q in quant.values())
    assert {n: q.nbytes() for n, q in quant.items()} == nbytes
    assert not [k for k in student.state_dict() if k.endswith("_train")]
    kronc.save(student, tmp_path / "q")
    again = kronc.load(tmp_path / "q")
    mine, theirs = student.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    x = toy_inputs("llama")
    with torch.no_grad():
        assert torch.equal(student(x).logits, again(x).logits)


def test_norms_and_biases_only_leave_the_scales_alone() -> None:
    torch.manual_seed(0)
    teacher = with_decaying_spectra(TOY_MODELS["llama"]())
    student = kronc.compile(teacher, policy="int4-kernels", budget="5x")
    before = {k: v.clone() for k, v in student.state_dict().items() if k.endswith("scales")}
    reconstruct_blocks(student, teacher, torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(1)),
                       seq_len=16, batch_size=4, progress=False, trainable="norms+biases",
                       blockwise={"samples": 8, "epochs": 1, "lr": 3e-3})
    after = student.state_dict()
    assert before and all(torch.equal(after[k], v) for k, v in before.items())
