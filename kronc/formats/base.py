"""The interface every compression format implements.

A format has two halves:

* a **spec** (`FormatSpec` subclass, a frozen pydantic model with a ``kind`` tag): the choice of
  format and its parameters. Specs are what plans and policies store. From a spec and a weight
  shape alone they give exact stored bytes, stored parameters and FLOPs per token, so the planner
  can price a candidate without fitting it.
* a **factorized weight** (`Factorized` subclass, an ``nn.Module``): the fitted representation of
  one weight matrix ``W`` of logical shape ``(out, in)``. It applies ``x @ W.T`` without building
  ``W`` (``forward``), gathers rows of ``W`` for embedding lookups (``rows``) and can rebuild ``W``
  for checks (``to_dense``). Its byte count is read off the tensors it actually stores, and the
  tests check that it equals the spec's formula.

Bytes count every stored tensor: values in the weight's dtype, sparse and block indices in the
integer dtype they are stored in. Bias vectors are not part of a site's weight bytes: they stay
dense and are the same before and after.

**Precision.** Every spec has a ``precision`` (`kronc.values.Precision`, default None: keep the
weight's dtype) for its stored float tensors, which the spec lists in `FormatSpec.stored_values`
(logical shape and the 2-D layout the codec groups along). One code path stores them all
(`Factorized.put`/`Factorized.value`): None keeps a trainable parameter in the weight's dtype; a
float precision (fp32/bf16/fp16) keeps a trainable parameter cast to it; an integer precision keeps a
`kronc.values.QuantizedTensor` (packed codes, fp16 scales, frozen). Formats other than dense read
their values back as floats (dequantized) and run their existing ops; dense runs
``kronc::quant_linear`` on the packed weight.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from torch import Tensor, nn

from ..values import FLOAT_DTYPES, Encoded, Precision, PrecisionError, QuantizedTensor

Shape = tuple[int, int]
Layout = Literal["rows", "transposed", "flat"]
"""How a stored tensor is viewed as the ``(rows, in)`` matrix the codec groups along its last dim:
``rows`` (``(..., n)`` as ``(prod(...), n)``), ``transposed`` (a ``(m, n)`` matrix as ``(n, m)``: a low-rank
``U`` grouped along the outputs of each component) or ``flat`` (``(k, ...)`` as ``(k, prod(...))``:
one row per Kronecker factor or block)."""


def storage_shape(shape: tuple[int, ...], layout: Layout) -> tuple[int, int]:
    """The 2-D shape the codec stores a tensor of ``shape`` in under ``layout``."""
    if layout == "transposed":
        return int(shape[1]), int(shape[0])
    if layout == "flat":
        return int(shape[0]), math.prod(shape[1:])
    return math.prod(shape[:-1]), int(shape[-1])


def to_storage(t: Tensor, layout: Layout) -> Tensor:
    return t.T if layout == "transposed" else t.reshape(storage_shape(tuple(t.shape), layout))


def from_storage(t: Tensor, shape: tuple[int, ...], layout: Layout) -> Tensor:
    return t.T if layout == "transposed" else t.reshape(shape)


class FormatError(ValueError):
    """A format parameter does not fit the weight it is applied to."""


class FormatSpec(BaseModel, ABC):
    """Parameters of one compression format, independent of any particular weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    precision: Precision | None = Field(default=None, description=(
        "Precision of the stored float tensors (fp32/bf16/fp16 cast, or int8/int4/int3/int2 with fp16 "
        "scales per group); None keeps the weight's dtype."))
    identity: ClassVar[bool] = False
    """True for the spec that leaves a weight as it is (dense): nothing to fit or swap."""
    rotates: ClassVar[bool] = False
    """Whether its precision may be rotated (``Precision.rotate``): only the dense weight's, whose module
    rotates its input; factors of the other formats are quantized as they are."""

    # Capabilities code outside the format asks about (recovery schemes), instead of switching on spec classes.

    @property
    def overlay_density(self) -> float | None:
        """Density of the sparse overlay stored beside the structured part; None for formats without one."""
        return None

    def with_overlay_density(self, density: float) -> FormatSpec:
        """This spec with its overlay at ``density`` (overlay annealing); formats without an overlay refuse."""
        raise FormatError(f"a {self.kind} spec has no sparse overlay to set the density of")

    @property
    def factor_rank(self) -> int | None:
        """``r`` when the format is exactly two factors ``U (out, r) @ V (r, in)``; None otherwise."""
        return None

    @model_serializer(mode="wrap")
    def _drop_default_precision(self, handler: SerializerFunctionWrapHandler) -> dict:
        """Plans and saved models written before precision existed stay byte-identical."""
        out = handler(self)
        if isinstance(out, dict) and out.get("precision", 0) is None:
            out.pop("precision")
        return out

    def stored_values(self, shape: Shape) -> dict[str, tuple[tuple[int, ...], Layout]]:
        """The float tensors a weight of ``shape`` stores: name -> (logical shape, codec layout).
        Formats list them so bytes and precision checks come from one place (empty: none listed)."""
        return {}

    def value_bytes(self, shape: tuple[int, ...], itemsize: int, layout: Layout = "rows") -> int:
        """Exact bytes of one stored float tensor at this spec's precision (``itemsize`` when None)."""
        if self.precision is None:
            return math.prod(shape) * itemsize
        return self.precision.nbytes(storage_shape(shape, layout))

    def values_bytes(self, shape: Shape, itemsize: int) -> int:
        """Bytes of every tensor `stored_values` lists."""
        return sum(self.value_bytes(s, itemsize, lay) for s, lay in self.stored_values(shape).values())

    def check_precision(self, shape: Shape) -> None:
        """`FormatError` naming the field and the allowed values when a stored tensor cannot take the precision."""
        if self.precision is None or self.precision.is_float:
            return
        if self.precision.rotate and not self.rotates:
            raise FormatError(f"{self.kind} precision {self.precision.describe()}: rotate=true applies to the dense format's "
                              f"weight only; use rotate=false for the values of a {self.kind} format")
        for name, (s, lay) in self.stored_values(shape).items():
            try:
                self.precision.check_shape(storage_shape(s, lay))
            except PrecisionError as e:
                raise FormatError(f"{self.kind} precision on a {shape[0]}x{shape[1]} weight, tensor {name!r}: {e}") from None

    def precision_tag(self) -> str:
        """``""`` or ``"@int4g32"``: the precision part of `describe`."""
        return "" if self.precision is None else f"@{self.precision.describe()}"

    @abstractmethod
    def check(self, shape: Shape) -> None:
        """Raise `FormatError` naming the parameter when this spec cannot represent ``shape``."""

    @abstractmethod
    def nbytes(self, shape: Shape, itemsize: int) -> int:
        """Exact bytes stored for a weight of ``shape`` with values of ``itemsize`` bytes."""

    @abstractmethod
    def nparams(self, shape: Shape) -> int:
        """Stored values (indices excluded)."""

    @abstractmethod
    def flops_per_token(self, shape: Shape) -> int:
        """Floating point operations (2 per multiply-add) to apply the weight to one input vector."""

    def describe(self) -> str:
        """Short human-readable form, e.g. ``kron(24x24)x2``."""
        fields = ",".join(f"{k}={v}" for k, v in self.model_dump(exclude={"kind", "precision"}).items())
        return f"{self.kind}({fields}){self.precision_tag()}"


class Factorized(nn.Module, ABC):
    """A weight matrix of logical shape ``(out, in)`` stored in a compressed format."""

    spec_type: ClassVar[type[FormatSpec]]
    factored_overhead: ClassVar[float] = 1.0
    """What one FLOP of this format's factored ops costs in GEMM FLOPs, forward and backward (measured;
    the training path's choice, `kronc.formats.training`). 1 for a format whose op is a GEMM."""

    def __init__(self, spec: FormatSpec, shape: Shape) -> None:
        super().__init__()
        spec.check(shape)
        self.spec = spec
        self.shape: Shape = (int(shape[0]), int(shape[1]))

    @classmethod
    @abstractmethod
    def fit(cls, weight: Tensor, spec: FormatSpec) -> Factorized:
        """Fit the format to a dense ``(out, in)`` weight (nearest in Frobenius norm)."""

    @classmethod
    def empty(cls, spec: FormatSpec, shape: Shape, dtype: torch.dtype) -> Factorized:
        """A module of ``spec``'s structure with uninitialised values, for loading a state dict into.

        The default fits a zero matrix; formats override it when fitting is slow or positions matter.
        """
        return cls.fit(torch.zeros(shape, dtype=dtype), spec)

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """``x @ W.T`` for ``x`` of shape ``(..., in)``, without materialising ``W``."""

    @abstractmethod
    def rows(self, index: Tensor) -> Tensor:
        """``W[index]`` of shape ``(*index.shape, in)``, without materialising ``W``."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The dense ``(out, in)`` matrix this format represents (for checks and references)."""

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the weight computes in (its dtype before quantization)."""
        found = getattr(self, "compute_dtype", None)
        return found if found is not None else next(t for t in self._stored() if t.is_floating_point()).dtype

    def put(self, name: str, tensor: Tensor, h: Tensor | None = None, encoded: Encoded | None = None) -> None:
        """Store value tensor ``name`` (listed by the spec's `stored_values`) at the spec's precision.

        The one place formats store float values: None keeps a parameter; a float precision a parameter
        of that dtype; an integer precision a `QuantizedTensor` of the tensor's codec layout (``h``: the
        ``(in, in)`` input Gram matrix of a ``rows`` layout tensor, for ``fit='gptq'``; tensors without one
        are fitted data-free by ``hqq``). ``encoded``: the tensor's codes already fitted at the spec's
        precision (`kronc.values.encode_many` fits many sites' GPTQ at once), stored as they are."""
        if getattr(self, "compute_dtype", None) is None:
            self.compute_dtype = tensor.dtype
        p = self.spec.precision
        if p is None:
            setattr(self, name, nn.Parameter(tensor.detach().clone(memory_format=torch.contiguous_format)))
        elif p.is_float:
            setattr(self, name, nn.Parameter(tensor.detach().to(FLOAT_DTYPES[p.dtype], copy=True).contiguous()))
        else:
            _, layout = self.spec.stored_values(self.shape)[name]
            wanted = p
            if encoded is not None:
                if encoded.precision != p or encoded.shape != tuple(to_storage(tensor, layout).shape):
                    raise ValueError(f"{name}: the given codes are {encoded.precision.describe()} {encoded.shape}, "
                                     f"the spec wants {p.describe()} {tuple(to_storage(tensor, layout).shape)}")
                qt = QuantizedTensor(encoded)
            else:
                if p.fit == "gptq" and (h is None or layout != "rows"):
                    p, h = p.model_copy(update={"fit": "hqq"}), None
                qt = QuantizedTensor.from_float(to_storage(tensor.detach().float(), layout).contiguous(), p, h)
            qt.precision = wanted  # the spec's (gptq stays gptq where it fell back)
            setattr(self, name, qt)

    def value(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """Value tensor ``name`` as floats in ``dtype`` (default: the compute dtype), dequantized if stored
        as integers (differentiable for float precisions)."""
        t = getattr(self, name)
        dtype = dtype or self.dtype
        if isinstance(t, QuantizedTensor):
            shape, layout = self.spec.stored_values(self.shape)[name]
            return from_storage(t.dequantize(dtype), shape, layout)
        return t if t.dtype == dtype else t.to(dtype)

    def _stored(self) -> list[Tensor]:
        return [*self.parameters(), *self.buffers()]

    def _apply(self, fn, recurse: bool = True):
        """A float cast of the module (``.double()``, ``.to(torch.bfloat16)``) moves the compute dtype
        with it; quantized values keep their stored precision (`QuantizedTensor`)."""
        out = super()._apply(fn, recurse)
        found = getattr(self, "compute_dtype", None)
        if found is not None:
            self.compute_dtype = fn(torch.zeros(0, dtype=found)).dtype
        return out

    def nbytes(self) -> int:
        """Bytes of every tensor this module stores (values, scales and indices)."""
        return sum(t.numel() * t.element_size() for t in self._stored())

    def nparams(self) -> int:
        """Stored values (floats and quantized values; scales and indices excluded)."""
        quant = [m for m in self.modules() if isinstance(m, QuantizedTensor)]
        scales = sum(t.numel() for q in quant for t in q.buffers() if t.is_floating_point())
        floats = sum(t.numel() for t in self._stored() if t.is_floating_point())
        return floats - scales + sum(math.prod(q.shape) for q in quant)

    def flops_per_token(self) -> int:
        return self.spec.flops_per_token(self.shape)

    def factored_cost(self) -> float:
        """What applying the weight to one token costs with the factored ops, forward and backward, in GEMM
        FLOPs per pass: ``flops_per_token * factored_overhead`` (the training path's choice,
        `kronc.formats.training`); a format made of parts with different overheads sums them."""
        return self.flops_per_token() * self.factored_overhead

    def build_flops(self) -> int:
        """FLOPs of `dense_weight` (the training path weighs them against the factored product's,
        `kronc.formats.training`); the default, one write per entry, fits formats that scatter values."""
        return self.shape[0] * self.shape[1]

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        """``W`` built from the stored values with autograd (their gradients flow back through it), in
        ``dtype``: the transient weight of the dense training path. The default is `to_dense`."""
        w = self.to_dense()
        return w if w.dtype == dtype else w.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}, {self.spec.describe()}"


def check_matrix(weight: Tensor, what: str = "weight") -> None:
    if weight.dim() != 2:
        raise FormatError(f"{what} must be a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise FormatError(f"{what} must be floating point, got {weight.dtype}")


def svd_dtype(weight: Tensor) -> torch.dtype:
    """SVDs and fits run in at least float32 (float64 stays float64)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32
