"""Calibration: the input second moment ``H = E[x x^T]`` of every site, from a few batches.

`collect_input_moments` runs the model on calibration batches with forward hooks on the modules
that own the sites and accumulates ``X^T X`` in float64 on the CPU (each batch's product is formed in
float32 on the activation's device: 4-8x faster than float64 on CPUs, ~1e-6 relative rounding),
divided by the number of rows at the end.

* ``linear`` / ``conv1d`` sites: the module's input is the activation (``(..., in)``, also for the
  transposed HF ``Conv1D``). Sites reading the same tensor one after another (q/k/v, gate/up) share
  one product.
* ``lstm`` sites: the LSTM is re-run layer by layer in the hook (evaluation semantics, no inter-layer
  dropout) so that ``weight_ih_l{k}`` gets layer ``k``'s input sequence and ``weight_hh_l{k}`` the
  hidden states it multiplies (``h_0, ..., h_{T-1}``). Bidirectional LSTMs, ``proj_size`` and packed
  sequences are skipped (their sites get no moments and fall back to the weight metric).
* ``embedding`` sites (lookups, not products) and ``functional`` sites (no module input to hook)
  get no moments.

No per-layer *sensitivity* is measured here: the planner's damage is the layer's own output error
(see `planner`), and `make_plan` takes an optional ``importance`` multiplier per site for callers
that have a sensitivity estimate (e.g. gradients or a leave-one-out loss probe).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..sites import Site

_LSTM_ATTR = re.compile(r"weight_(ih|hh)_l(\d+)")


class _Moments:
    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}
        self._last: tuple[Tensor, int, Tensor] | None = None  # the last input seen, its version, X^T X

    def add(self, name: str, x: Tensor, dim: int) -> None:
        if x.shape[-1] != dim:
            warnings.warn(f"input of {name} has {x.shape[-1]} features, expected {dim}; skipped", stacklevel=3)
            return
        if self._last is not None and self._last[0] is x and self._last[1] == x._version:
            xtx = self._last[2]
        else:
            x2 = x.detach().reshape(-1, dim)
            x2 = x2.float() if x2.dtype != torch.float64 else x2
            xtx = (x2.T @ x2).to(device="cpu", dtype=torch.float64)  # one batch in float32, sums in float64
            self._last = (x, x._version, xtx)
        rows = x.numel() // dim
        if name in self.sums:
            self.sums[name] += xtx
            self.rows[name] += rows
        else:
            self.sums[name] = xtx.clone()
            self.rows[name] = rows

    def result(self) -> dict[str, Tensor]:
        return {name: s / self.rows[name] for name, s in self.sums.items() if self.rows[name] > 0}


def _linear_hook(acc: _Moments, group: list[Site]) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not args or not isinstance(args[0], Tensor):
            return
        for site in group:
            acc.add(site.name, args[0], site.shape[1])

    return hook


def _lstm_hook(acc: _Moments, group: list[Site]) -> Any:
    wanted: dict[tuple[str, int], Site] = {}
    for site in group:
        m = _LSTM_ATTR.fullmatch(site.attr)
        if m:
            wanted[(m.group(1), int(m.group(2)))] = site

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        assert isinstance(module, nn.LSTM)
        x = args[0] if args else None
        if not isinstance(x, Tensor) or module.bidirectional or module.proj_size:
            return
        batched = x.dim() == 3
        seq = x if batched else x.unsqueeze(1)  # (T, B, in) or (B, T, in) when batch_first
        if module.batch_first and batched:
            seq = seq.transpose(0, 1)
        state = args[1] if len(args) > 1 else None
        steps, batch = seq.shape[0], seq.shape[1]
        inp = seq
        for k in range(module.num_layers):
            layer = nn.LSTM(inp.shape[-1], module.hidden_size, num_layers=1, bias=module.bias).to(seq.device, seq.dtype)
            params = {f"{kind}_l0": getattr(module, f"{kind}_l{k}") for kind in ("weight_ih", "weight_hh")}
            if module.bias:
                params |= {f"{kind}_l0": getattr(module, f"{kind}_l{k}") for kind in ("bias_ih", "bias_hh")}
            layer.load_state_dict({n: p.detach() for n, p in params.items()})
            if state is None:
                h0 = seq.new_zeros(1, batch, module.hidden_size)
                c0 = torch.zeros_like(h0)
            else:
                h0 = state[0][k : k + 1] if batched else state[0][k : k + 1].unsqueeze(1)
                c0 = state[1][k : k + 1] if batched else state[1][k : k + 1].unsqueeze(1)
            out, _ = layer(inp, (h0, c0))
            if ("ih", k) in wanted:
                acc.add(wanted[("ih", k)].name, inp, inp.shape[-1])
            if ("hh", k) in wanted:
                acc.add(wanted[("hh", k)].name, torch.cat([h0, out[: steps - 1]], 0), module.hidden_size)
            inp = out

    return hook


def collect_input_moments(
    model: nn.Module,
    sites: Sequence[Site],
    batches: Iterable[Any],
    progress: bool = True,
) -> dict[str, Tensor]:
    """``{site name: E[x x^T]}`` (float64, CPU, ``(in, in)``) over the rows of every batch.

    Each batch is passed as ``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list,
    else ``model(batch)``; under ``torch.no_grad()`` and in eval mode (restored afterwards). Sites
    that never ran, and kinds without a module input (see the module docstring), are absent.
    """
    acc = _Moments()
    groups: dict[str, list[Site]] = {}
    for site in sites:
        if site.kind in ("linear", "conv1d", "lstm"):
            groups.setdefault(site.owner, []).append(site)
    handles = []
    for owner, group in groups.items():
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            warnings.warn(f"no module {owner!r} in the model: its sites get no input moments", stacklevel=2)
            continue
        if isinstance(module, nn.LSTM):
            if module.bidirectional or module.proj_size:
                warnings.warn(f"{owner}: bidirectional/projected LSTMs get no input moments", stacklevel=2)
                continue
            hook = _lstm_hook(acc, group)
        else:
            hook = _linear_hook(acc, [s for s in group if s.kind != "lstm"])
        handles.append(module.register_forward_hook(hook))
    training = model.training
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    try:
        model.eval()
        with torch.no_grad():
            for batch in tqdm(batches, desc="kronc: calibrating", unit="batch", total=total, disable=not progress):
                if isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                acc._last = None
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return acc.result()
