"""Session setup shared by the tests."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the kronc Triton kernels run under the Triton interpreter on CPU tensors
    # (tests/codegen/test_triton_kernels.py); triton reads this when it is first imported, so set it here,
    # before any test module imports kronc (and with it triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")
