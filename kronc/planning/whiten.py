"""The data-aware metric: input second moments, damped, and their Cholesky whitener.

With ``H = E[x x^T]`` the expected squared output error of replacing ``W`` by ``W'`` is
``tr((W - W') H (W - W')^T)``. The planner uses the damped ``H_d = H + damping * mean(diag H) * I``
(as GPTQ does) so that dead input channels still count a little and ``H_d`` has a Cholesky factor
``S`` (lower triangular, ``H_d = S S^T``): ``tr(E H_d E^T) = ||E S||_F^2``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def damped(moments: Tensor, damping: float = 0.01) -> Tensor:
    """``H + damping * mean(diag H) * I`` in float64, symmetrised; identity if ``H`` is all zero."""
    h = moments.detach().to(device="cpu", dtype=torch.float64)
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"input moments must be a square (in, in) matrix, got shape {tuple(h.shape)}")
    h = 0.5 * (h + h.T)
    scale = float(h.diagonal().mean())
    if not scale > 0:
        return torch.eye(h.shape[0], dtype=torch.float64)
    return h + (damping * scale) * torch.eye(h.shape[0], dtype=torch.float64)


def whitener(h_damped: Tensor) -> Tensor:
    """Lower Cholesky factor ``S`` of a damped moment matrix (more jitter if it is not numerically PD)."""
    jitter = 0.0
    scale = float(h_damped.diagonal().mean())
    eye = torch.eye(h_damped.shape[0], dtype=h_damped.dtype)
    for _ in range(6):
        s, info = torch.linalg.cholesky_ex(h_damped + jitter * eye)
        if int(info) == 0:
            return s
        jitter = max(jitter * 10, 1e-10 * scale)
    raise ValueError("input moments are not positive semidefinite (Cholesky failed even with jitter)")


def column_scale(h_damped: Tensor) -> Tensor:
    """``sqrt(diag H_d)``: how much each input column moves the output on average (float64).

    Sparse formats rank entries by ``|W_ij| * column_scale_j`` under the data-aware metric: the
    diagonal part of ``tr(E H E^T)``, as Wanda does.
    """
    return h_damped.diagonal().clamp_min(0).sqrt()
