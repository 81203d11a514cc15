"""The value codec: encode a float tensor at a `Precision`, store it packed, decode it back.

`encode` fits levels (`fits.py`), packs them (`pack.py`) and returns an `Encoded` (packed codes,
fp16 scales, optional fp16 minima, the original shape). `QuantizedTensor` is the ``nn.Module`` a
format stores any of its tensors through: its buffers are exactly the stored bytes (``nbytes()`` is
read off them and equals ``Precision.nbytes(shape)``), ``dequantize()`` gives the float tensor, and
``linear(x, bias)`` runs ``kronc::quant_linear`` on the packed weight. Float precisions go through
the same interface as a cast. A rotated precision (``rotate``) stores the levels of ``W R``:
`encode` rotates the tensor (and a GPTQ Gram matrix, ``Rᵀ H R``) before fitting, `decode`
un-rotates, and ``linear`` rotates ``x`` before the op, so every path sees the same ``W'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..codegen.ops.quant import quant_linear_any
from ..reference.pack import pack, unpack
from .fits import Levels, fit_levels
from .grid import level_range
from .latent import fake_levels, fake_quantize, latent_values
from .precision import Precision
from .rotation import rotate, rotate_gram, unrotate

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Encoded:
    """A tensor at a precision: ``codes`` (the cast values for floats; int8 levels or packed uint8 bytes
    ``(rows, packed)`` otherwise), ``scales``/``minima`` fp16 ``(rows, groups)`` (None when unused)."""

    precision: Precision
    shape: tuple[int, ...]
    codes: Tensor
    scales: Tensor | None = None
    minima: Tensor | None = None

    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.minima) if t is not None)


def encode_levels(lv: Levels, p: Precision, shape: tuple[int, ...]) -> Encoded:
    """Pack fitted levels into an `Encoded`."""
    rows, inn = p.check_shape(shape)
    codes = pack(lv.q.reshape(rows, inn), p.bits, level_range(p)[0])
    minima = None if lv.minimum is None else lv.minimum.half()
    return Encoded(p, tuple(shape), codes.contiguous(), lv.scale.half().contiguous(), None if minima is None else minima.contiguous())


def encode(w: Tensor, p: Precision, h: Tensor | None = None) -> Encoded:
    """``w`` (any shape ``(..., in)``) at precision ``p``; ``h`` = ``X^T X`` ``(in, in)`` for ``fit='gptq'``."""
    shape = tuple(w.shape)
    p.check_shape(shape)
    if p.is_float:
        return Encoded(p, shape, w.detach().to(FLOAT_DTYPES[p.dtype]).clone())
    w = w.detach()
    if p.rotate:
        w = rotate(w.float())
        h = None if h is None else rotate_gram(h.double())
    return encode_levels(fit_levels(w, p, h), p, shape)


def decode_parts(codes: Tensor, scales: Tensor | None, minima: Tensor | None, p: Precision,
                 shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The float tensor the stored parts represent, in ``dtype``."""
    if p.is_float:
        return codes.to(dtype)
    rows, inn = p.check_shape(shape)
    assert scales is not None
    groups = scales.shape[1]
    q = unpack(codes, p.bits, level_range(p)[0], inn).reshape(rows, groups, inn // groups)
    w = q.float() * scales.float()[..., None]
    if minima is not None:
        w = w + minima.float()[..., None]
    w = w.reshape(shape)
    return (unrotate(w) if p.rotate else w).to(dtype)


def decode(e: Encoded, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `encode` up to the precision's rounding (exact for values on the grid)."""
    return decode_parts(e.codes, e.scales, e.minima, e.precision, e.shape, dtype)


def _fp16_forward(t: Tensor) -> Tensor:
    """``t`` rounded to fp16 in the forward pass, its gradient passed straight through (fp32 training of
    values stored as fp16)."""
    return t + (t.detach().half().float() - t.detach())


class QuantizedTensor(nn.Module):
    """One stored tensor at a `Precision`, held as buffers (``codes``, ``scales``, ``minima``) so
    ``state_dict``/``.to(device)``/save-load carry exactly the packed bytes."""

    codes: Tensor
    scales: Tensor | None
    minima: Tensor | None
    _latent_base: tuple[Tensor, Tensor | None]  # the grid the latent weights are measured on (`train_latent`)

    def __init__(self, encoded: Encoded) -> None:
        super().__init__()
        self.precision = encoded.precision
        self.shape = tuple(encoded.shape)
        self.register_buffer("codes", encoded.codes)
        self.register_buffer("scales", encoded.scales)
        self.register_buffer("minima", encoded.minima)

    @classmethod
    def from_float(cls, w: Tensor, p: Precision, h: Tensor | None = None) -> QuantizedTensor:
        """Encode ``w`` at ``p`` (``h`` for gptq) and hold the result."""
        return cls(encode(w, p, h))

    def encoded(self) -> Encoded:
        return Encoded(self.precision, self.shape, self.codes, self.scales, self.minima)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The represented float tensor (original shape) in ``dtype``; differentiable in the scales and
        minima while they train (`train_scales`), and in the latent weights while they do (`train_latent`:
        the latent weights fake-quantized on the trained grid, exactly what `commit_latent` stores)."""
        scales, minima = self.trained_scales() if self.trains_scales else (self.scales, self.minima)
        if self.trains_latent:
            assert scales is not None  # only quantized tensors train latent weights
            lo, hi = level_range(self.precision)
            w = fake_quantize(self._latent(), scales, minima, lo, hi).reshape(self.shape)
            return (unrotate(w) if self.precision.rotate else w).to(dtype)  # levels of W R: back to W
        return decode_parts(self.codes, scales, minima, self.precision, self.shape, dtype)

    def rows(self, index: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W[index]`` of shape ``(*index.shape, in)`` in ``dtype`` for a 2-D tensor, decoding only the gathered
        rows (an embedding lookup reads a few rows of a large table: decoding all of it per call would cost
        the whole table's bytes). Same values as ``dequantize(dtype)[index]``: rows decode independently."""
        if len(self.shape) != 2:
            raise ValueError(f"QuantizedTensor.rows needs a 2-D (rows, in) tensor, got shape {self.shape}")
        if self.trains_scales or self.trains_latent:  # differentiable paths go through the whole tensor
            return self.dequantize(dtype)[index]
        flat = index.reshape(-1)
        codes = self.codes.index_select(0, flat)
        scales = None if self.scales is None else self.scales.index_select(0, flat)
        minima = None if self.minima is None else self.minima.index_select(0, flat)
        w = decode_parts(codes, scales, minima, self.precision, (flat.numel(), self.shape[1]), dtype)
        return w.reshape(*index.shape, self.shape[1])

    def trained_scales(self) -> tuple[Tensor, Tensor | None]:
        """The scales and minima the trainable parameters give, rounded to fp16 in the forward pass (the
        gradient passes straight through): ``scales * scales_train`` and ``minima + minima_train * scale``."""
        if self.scales is None:
            raise ValueError("float values have no scales to train")
        scales = _fp16_forward(self.scales.float() * self.scales_train)
        minima = self.minima
        if minima is not None:
            minima = _fp16_forward(minima.float() + self.minima_train * scales.detach())
        return scales, minima

    @property
    def trains_scales(self) -> bool:
        """True between `train_scales` and `commit_scales`."""
        return "scales_train" in self._parameters

    def train_scales(self) -> list[nn.Parameter]:
        """Make the group scales (and minima) trainable, the integer codes frozen: fp32 parameters
        ``scales_train`` (a factor per scale, from 1) and ``minima_train`` (a shift per minimum in units of
        its scale, from 0). Relative parameters make one learning rate fit every tensor, however small its
        scales. The forward pass sees the results rounded to fp16, so what trains is what `commit_scales`
        stores. Returns the new parameters (none for float precisions, or when they train already)."""
        if self.precision.is_float or self.scales is None or self.trains_scales:
            return []
        self.scales_train = nn.Parameter(torch.ones_like(self.scales, dtype=torch.float32))
        if self.minima is not None:
            self.minima_train = nn.Parameter(torch.zeros_like(self.minima, dtype=torch.float32))
        return [p for n, p in self._parameters.items() if n.endswith("_train") and p is not None]

    @property
    def trains_latent(self) -> bool:
        """True between `train_latent` and `commit_latent` (or `discard_latent`)."""
        return "latent_train" in self._parameters

    def train_latent(self) -> list[nn.Parameter]:
        """Make the weights themselves trainable through fake quantization (EfficientQAT's Block-AP,
        `kronc.values.latent`): an fp32 parameter ``latent_train`` ``(rows, groups, group)`` of latent levels in
        units of the current grid step, initialised to the stored levels (so the tensor is unchanged until it
        trains), on top of `train_scales`. Returns the new parameters (the scales' too when they were not
        training yet; none for float precisions or when the latent weights train already)."""
        if self.precision.is_float or self.scales is None or self.trains_latent:
            return []
        new = self.train_scales()
        with torch.no_grad():
            scales, minima = self.trained_scales()
            s0, m0 = scales.detach().clone(), None if minima is None else minima.detach().clone()
            rows, inn = self.precision.check_shape(self.shape)
            groups = self.scales.shape[1]
            q = unpack(self.codes, self.precision.bits, level_range(self.precision)[0], inn)
        self._latent_base = (s0, m0)
        self.latent_train = nn.Parameter(q.float().reshape(rows, groups, inn // groups))
        return [*new, self.latent_train]

    def _latent(self) -> Tensor:
        s0, m0 = self._latent_base
        return latent_values(self.latent_train, s0, m0)

    def commit_latent(self) -> None:
        """Re-encode the latent weights with the trained scales and minima into the stored buffers (the same
        packed layout and bytes; the tensor then decodes to exactly what the last forward pass used), reset
        the scale parameters to the identity on the new scales, and drop the latent parameter."""
        if not self.trains_latent:
            return
        assert self.scales is not None  # only quantized tensors train latent weights
        lo, hi = level_range(self.precision)
        with torch.no_grad():
            scales, minima = self.trained_scales()
            u = fake_levels(self._latent(), scales, minima, lo, hi)
            rows, inn = self.precision.check_shape(self.shape)
            codes = pack(u.reshape(rows, inn).to(torch.int32), self.precision.bits, lo)
            if codes.shape != self.codes.shape or codes.dtype != self.codes.dtype:  # the budget must not move
                raise AssertionError(f"re-encoded codes {tuple(codes.shape)} {codes.dtype} differ from the stored "
                                     f"{tuple(self.codes.shape)} {self.codes.dtype}")
            self.codes.copy_(codes)
            self.scales.copy_(scales.half())
            if minima is not None and self.minima is not None:
                self.minima.copy_(minima.half())
            self.scales_train.fill_(1.0)
            if "minima_train" in self._parameters:
                self.minima_train.zero_()
        self.discard_latent()

    def discard_latent(self) -> None:
        """Drop the latent parameter without storing it (an interrupted block: the stored codes stay)."""
        self._parameters.pop("latent_train", None)
        self.__dict__.pop("_latent_base", None)

    def commit_scales(self) -> None:
        """Store the trained scales (and minima) as fp16 in the buffers and drop the parameters: the stored
        bytes keep their layout, so ``nbytes`` and save/load stay exact. Latent weights still training are
        re-encoded first (`commit_latent`)."""
        self.commit_latent()
        if not self.trains_scales:
            return
        with torch.no_grad():
            scales, minima = self.trained_scales()
            assert self.scales is not None  # trains_scales implies quantized values
            self.scales.copy_(scales.half())
            if minima is not None and self.minima is not None:
                self.minima.copy_(minima.half())
        self._parameters.pop("scales_train")
        self._parameters.pop("minima_train", None)

    def nbytes(self) -> int:
        """Bytes of the stored buffers (equals ``self.precision.nbytes(self.shape)``)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x @ W.T + bias`` with this tensor as the ``(out, in)`` weight, through ``kronc::quant_linear``."""
        if len(self.shape) != 2:
            raise ValueError(f"QuantizedTensor.linear needs a 2-D (out, in) weight, got shape {self.shape}")
        if self.precision.is_float:
            return nn.functional.linear(x, self.codes.to(x.dtype), bias)
        if self.trains_scales:  # the packed op has no gradient for the scales, and holds the untrained ones
            return nn.functional.linear(x, self.dequantize(x.dtype), bias)
        if self.precision.rotate:  # (x R) Q(W R)ᵀ = x Wᵀ
            x = rotate(x)
        assert self.scales is not None  # integer precisions always store scales
        return quant_linear_any(x, self.codes, self.scales, self.minima, bias, self.precision.bits)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply; dtype casts (``.half()``, ``.to(torch.float64)``) do not: the stored
        precision is chosen by the `Precision`, not by the model's float dtype."""
        dtypes = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            b = self._buffers[name]
            if b is not None and b.dtype != dtype:
                self._buffers[name] = b.to(dtype)
        return self

    def extra_repr(self) -> str:
        return f"shape={self.shape}, precision={self.precision.describe()}, nbytes={self.nbytes()}"
