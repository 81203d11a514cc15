"""The value codec: bits per stored value for every format's tensors (see `precision`, `codec`, `fits`,
`joint`). Sits above `kronc.codegen` (its `quant_linear` op) and below `kronc.formats`."""

from __future__ import annotations

from .batch import encode_many
from .codec import FLOAT_DTYPES, Encoded, QuantizedTensor, decode, encode, encode_levels
from .fits import GPTQ_DAMPING, Levels, clip_search_residual, fit_clip, fit_gptq, fit_hqq, fit_levels, fit_rtn
from .gptq import gptq_batch
from .joint import JointFit, fit_joint
from .precision import GROUP_SIZES, Precision, PrecisionError

__all__ = [
    "FLOAT_DTYPES", "GPTQ_DAMPING", "GROUP_SIZES", "Encoded", "JointFit", "Levels", "Precision", "PrecisionError", "QuantizedTensor", "decode",
    "clip_search_residual", "encode", "encode_levels", "encode_many", "fit_clip", "fit_gptq", "fit_hqq", "fit_joint", "fit_levels", "fit_rtn",
    "gptq_batch",
]
