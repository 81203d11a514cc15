"""``kronc::quant_linear``: ``x @ dequant(W).T + bias`` for a weight stored by the value codec.

The weight is ``codes`` (int8 levels ``(out, in)`` for 8 bits, packed uint8 bytes otherwise, the
layout of `kronc.reference.pack`), fp16 ``scales`` ``(out, groups)`` and, for asymmetric grids, fp16
``minima`` ``(out, groups)``; the group size is ``in // groups``. ``bits`` is 8, 4, 3 or 2.

CPU paths, chosen per call by `cpu_path` from measurements by ``benchmarks/quant_ops.py`` on this
machine (AVX512 with bf16, torch 2.13, SmolLM2 shapes):

* ``int8pack``: ``aten._weight_int8pack_mm`` for symmetric int8 with one scale per row and ``in`` a multiple
  of 16 (the kernel's limit);
* ``int4pack``: ``aten._weight_int4pack_mm_for_cpu`` for int4, int3 and int2 with groups of 32/64/128
  and ``out`` a multiple of 16 (the kernel's limits). The kernel computes ``(u - 8) * scale + zero``
  from a 4-bit ``u``; 3- and 2-bit levels are 4-bit levels that use part of the range, so the same
  kernel runs them exactly. Its packed layout (4 bits per value) is built once per ``codes`` tensor
  and cached (eager and compiled runs alike: the op is opaque to tracing); that cache is a second
  copy of the weight in memory, 4 bits per value plus bf16 scales and zeros;
* ``dequant``: decode to ``x``'s dtype, then ``F.linear`` (asymmetric or grouped int8, groups of 16,
  shapes the packed kernels refuse, and inputs of many tokens). On CUDA: the Triton kernel.

Rule: the packed kernels always compute in **bfloat16** (a float32/float16 ``x`` is cast, the output
cast back; their own float32 paths are scalar and slower than dequantize-then-GEMM). They run for
bf16 ``x`` of at most `PACKED_MAX_TOKENS` tokens (above that dequantize-then-GEMM wins) and for
float32/float16 ``x`` of at most `DECODE_MAX_TOKENS` tokens in inference calls (gradients off, as
``generate`` runs, through `quant_linear_any`: decode, where dequantizing every weight on every call
costs 10-100x the matmul); larger float32 inputs, and calls with gradients on (``kronc::quant_linear``
itself), keep their precision. Timings:
``benchmarks/results/design_measurements.md`` ("int4 packed kernels", "decode").

The op is a plain ``torch.library.custom_op`` (not ``triton_op``) so its cache lives outside any
trace; on CUDA it runs the Triton kernel that dequantizes inside the matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ...reference.pack import unpack
from ..backend import KernelUnavailable, kernel_mode, use_triton
from ..checks.common import OpCtx, fail, is_traced, needs_grad, tensor_version
from ..checks.quant import INT4_GROUPS, check_quant, level_offset

INT4_KERNEL_BITS = (4, 3, 2)
"""Bit widths the int4 packed kernel runs (fewer levels of the same 4-bit grid)."""

INT8_K_MULTIPLE = 16
"""``aten._weight_int8pack_mm`` reads ``in`` in blocks of 16: other widths (a 24-wide LSTM state) came back as garbage
or crashed the process (torch 2.13, CPU), so they dequantize."""

PACKED_DTYPES = (torch.bfloat16,)
"""Activation dtypes for which the aten packed kernels are faster than dequantize-then-GEMM here."""
PACKED_MAX_TOKENS = 256
"""Above this many tokens, dequantize-then-GEMM beats the packed kernels (the crossover measured in
``benchmarks/results/design_measurements.md``)."""
DECODE_MAX_TOKENS = 8
"""float32/float16 activations of at most this many tokens (decode: one token per sequence), with gradients
off, run the packed kernels on a bfloat16 copy of ``x`` (output cast back): at one token that is 10-100x faster than
dequantizing the weight on every call. Larger inputs (prefill, perplexity) keep ``x``'s precision."""


def dequantize(codes: Tensor, scales: Tensor, minima: Tensor | None, bits: int, inn: int,
               dtype: torch.dtype) -> Tensor:
    """The ``(out, in)`` weight in ``dtype`` (reference decode, same math as `kronc.values.codec`)."""

    out, groups = scales.shape
    q = unpack(codes, bits, level_offset(bits, minima is None), inn).reshape(out, groups, inn // groups)
    w = q.float() * scales.float()[..., None]
    if minima is not None:
        w = w + minima.float()[..., None]
    return w.reshape(out, inn).to(dtype)


def packed_path(x: Tensor, scales: Tensor, minima: Tensor | None, bits: int) -> str | None:
    """The aten packed kernel that can run this weight (any float ``x``), or None."""
    out, groups = scales.shape
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if bits == 8 and groups == 1 and minima is None and x.shape[-1] % INT8_K_MULTIPLE == 0:
        return "int8pack"
    if bits in INT4_KERNEL_BITS and out % 16 == 0 and x.shape[-1] // groups in INT4_GROUPS:
        return "int4pack"
    return None


def cpu_path(x: Tensor, scales: Tensor, minima: Tensor | None, bits: int, tokens: int, inference: bool = False) -> str:
    """Which CPU implementation runs: ``int8pack``, ``int4pack`` or ``dequant`` (see module docstring).

    ``inference``: the call was made with gradients off (`quant_linear_any` decides, outside the op: inside
    it, grad mode depends on whether an input requires grad)."""
    packed = packed_path(x, scales, minima, bits)
    if packed is None:
        return "dequant"
    if x.dtype in PACKED_DTYPES:
        return packed if tokens <= PACKED_MAX_TOKENS else "dequant"
    return packed if tokens <= DECODE_MAX_TOKENS and inference else "dequant"


_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Per ``codes`` tensor: (versions, scales, minima, kernel operands...), see `_operands`."""


def _operands(codes: Tensor, scales: Tensor, minima: Tensor | None, bits: int, inn: int) -> tuple[Tensor, Tensor]:
    """The packed kernel's weight and scale operands for ``codes``, built once and cached.

    int8pack: the int8 codes and the bf16 row scales. int4pack: the kernel's packed layout and its
    ``(groups, out, 2)`` bf16 scales-and-zeros. The kernel computes ``(k - 8) * scale + zero`` from a
    4-bit ``k``; the codec's value is ``(u + lo) * scale (+ minimum)`` for its level ``u``. With
    ``k = u + c``: ``zero = (lo + 8 - c) * scale (+ minimum)``. ``c`` keeps the zero small, since it is
    rounded to bf16 and its error lands on every value of the group: ``c = 8 + lo`` for a symmetric
    grid (zero 0, exact), ``8 - 2^(b-1)`` for an asymmetric one (zero = minimum + half the range).
    The entry is rebuilt when any of the tensors is replaced or changed in place (its version
    counter moves).
    """
    key = (tensor_version(codes), tensor_version(scales), None if minima is None else tensor_version(minima))
    seen = _cache.get(codes)
    if seen is not None and seen[0] == key and seen[1] is scales and seen[2] is minima:
        return codes if seen[3] is None else seen[3], seen[4]
    if bits == 8:
        weight, sz = None, scales[:, 0].to(torch.bfloat16)  # not codes itself: the entry would keep its key alive
    else:
        lo = level_offset(bits, minima is None)
        c = 8 + lo if minima is None else 8 - 2 ** (bits - 1)
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack(codes, bits, c, inn), 1)
        s = scales.float()
        zero = (lo + 8 - c) * s + (0 if minima is None else minima.float())
        sz = torch.stack([s, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    if not is_traced(codes, scales, minima):
        _cache[codes] = (key, scales, minima, weight, sz)
    return codes if weight is None else weight, sz


def quant_linear_cpu(x: Tensor, codes: Tensor, scales: Tensor, minima: Tensor | None,
                     bias: Tensor | None, bits: int, path: str | None = None, inference: bool = False) -> Tensor:
    """The torch implementation; ``path`` forces one of `cpu_path`'s choices (benchmarks, tests)."""
    check_quant("quant_linear", x, codes, scales, minima, bias, bits)
    if path is not None and path != "dequant" and packed_path(x, scales, minima, bits) != path:
        raise fail("quant_linear", f"path {path!r} cannot run {bits}-bit weights with {scales.shape[1]} groups, "
                                   f"{scales.shape[0]} outputs and {x.dtype} input")
    return _run_cpu(x, codes, scales, minima, bias, bits, path, inference)


def _run_cpu(x: Tensor, codes: Tensor, scales: Tensor, minima: Tensor | None, bias: Tensor | None, bits: int,
             path: str | None, inference: bool = False) -> Tensor:
    """`quant_linear_cpu` after the checks (the op checks once; at one token the Python around the kernel is
    a large part of a call)."""
    out, groups = scales.shape
    inn = x.shape[-1]
    x2 = x.reshape(-1, inn)
    path = path or cpu_path(x, scales, minima, bits, x2.shape[0], inference)
    if path == "dequant":
        y = F.linear(x2, dequantize(codes, scales, minima, bits, inn, x.dtype))
    else:
        weight, sz = _operands(codes, scales, minima, bits, inn)
        xb = x2.to(torch.bfloat16).contiguous()
        if path == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(xb, weight, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, weight, inn // groups, sz)
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out)


@torch.library.custom_op("kronc::quant_linear", mutates_args=())
def quant_linear(x: Tensor, codes: Tensor, scales: Tensor, minima: Tensor | None, bias: Tensor | None,
                 bits: int) -> Tensor:
    """``x @ dequant(codes, scales, minima).T + bias`` for ``x`` of shape ``(..., in)``."""
    check_quant("quant_linear", x, codes, scales, minima, bias, bits)
    if use_triton("quant_linear", x):
        if bits in (8, 4, 2):
            from ..triton import quant_matmul

            return quant_matmul.quant_linear(x, codes, scales, minima, bias, bits)
        if kernel_mode() == "triton":
            raise KernelUnavailable(f"kronc::quant_linear: the Triton kernel takes 8-, 4- or 2-bit weights, not {bits}")
    return _run_cpu(x, codes, scales, minima, bias, bits, None).contiguous()


def quant_linear_any(x: Tensor, codes: Tensor, scales: Tensor, minima: Tensor | None, bias: Tensor | None,
                     bits: int) -> Tensor:
    """`quant_linear`, or a leaner route to the same CPU implementation for inference calls.

    Why: at one token the custom op's dispatch (autograd wrapper, redispatch, aliasing check, dynamo
    guard) costs several times the int4 kernel itself, and a decode step makes one call per linear.
    On CPU with gradients off: an eager call runs the implementation directly, and a call traced by
    ``torch.compile`` or ``torch.export`` becomes ``kronc::quant_linear_infer`` (the same
    implementation registered without the custom-op and autograd layers, so it has no gradient;
    dynamo guards on grad mode, so a compiled graph with it only runs with gradients off). Both take
    the decode path of `cpu_path` (``inference``), so eager, compiled and exported inference agree.
    Everything else (gradients on, dispatch modes, CUDA, Triton mode) keeps ``kronc::quant_linear``.
    """
    if x.device.type == "cpu" and kernel_mode() != "triton" and not (x.requires_grad or torch.is_grad_enabled()):
        if torch.compiler.is_compiling():  # torch.compile and torch.export
            return torch.ops.kronc.quant_linear_infer(x, codes, scales, minima, bias, bits)
        if not is_traced(x):
            return quant_linear_cpu(x, codes, scales, minima, bias, bits, inference=True)
    return quant_linear(x, codes, scales, minima, bias, bits)


_lib = torch.library.Library("kronc", "FRAGMENT")
_lib.define("quant_linear_infer(Tensor x, Tensor codes, Tensor scales, Tensor? minima, Tensor? bias, int bits) -> Tensor")


def _infer_cpu(x: Tensor, codes: Tensor, scales: Tensor, minima: Tensor | None, bias: Tensor | None,
               bits: int) -> Tensor:
    return quant_linear_cpu(x, codes, scales, minima, bias, bits, inference=True).contiguous()


_lib.impl("quant_linear_infer", _infer_cpu, "CPU")


@quant_linear.register_fake
def _(x: Tensor, codes: Tensor, scales: Tensor, minima: Tensor | None, bias: Tensor | None,
      bits: int) -> Tensor:
    out, _ = check_quant("quant_linear", x, codes, scales, minima, bias, bits)
    return x.new_empty((*x.shape[:-1], out))


torch.library.register_fake("kronc::quant_linear_infer", _, lib=_lib)


def _setup(ctx: OpCtx, inputs: tuple, output: Tensor) -> None:
    x, codes, scales, minima, bias, bits = inputs
    ctx.save_for_backward(codes, scales, minima)
    ctx.bits, ctx.inn, ctx.dtype = bits, x.shape[-1], x.dtype


def _backward(ctx: OpCtx, g: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients for ``x`` and ``bias`` only: the stored integer weight is not trained."""
    codes, scales, minima = ctx.saved_tensors
    need = needs_grad(ctx, 6)
    w = dequantize(codes, scales, minima, ctx.bits, ctx.inn, g.dtype)
    gx = g @ w if need[0] else None
    gb = g.reshape(-1, g.shape[-1]).sum(0) if need[4] else None
    return gx, None, None, None, gb, None


quant_linear.register_autograd(_backward, setup_context=_setup)
