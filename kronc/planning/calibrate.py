"""Calibration: the input second moment ``H = E[x x^T]`` of every site, from a few batches.

`collect_input_moments` runs the model on calibration batches with forward hooks on the modules
that own the sites and accumulates ``X^T X`` in float64 on the CPU (each batch's product is formed in
float32 on the activation's device: several times faster than float64, at a rounding far below what
planning can see; figures in ``benchmarks/results/design_measurements.md``), divided by the number of
rows at the end.

* ``linear`` / ``conv1d`` sites: the module's input is the activation (``(..., in)``, also for the
  transposed HF ``Conv1D``). Sites reading the same tensor one after another (q/k/v, gate/up) share
  one product.
* ``lstm`` sites: the LSTM is re-run layer by layer in the hook (evaluation semantics, no inter-layer
  dropout) so that ``weight_ih_l{k}`` gets layer ``k``'s input sequence and ``weight_hh_l{k}`` the
  hidden states it multiplies (``h_0, ..., h_{T-1}``). Bidirectional LSTMs, ``proj_size`` and packed
  sequences are skipped (their sites get no moments and fall back to the weight metric).
* ``embedding`` sites (lookups, not products) and ``functional`` sites (no module input to hook)
  get no moments.

`collect_sensitivity` measures how much the model's loss moves per unit of output error at each
site: the mean squared gradient per output feature, ``κ = E ||g||² / out`` (a Fisher information,
so ``½ κ E ||ΔW x||²`` approximates the loss increase a change ``ΔW`` causes per token). The loss is
the next-token loss on the calibration text for causal language models (the empirical Fisher), the
log-likelihood of labels sampled from the model's own predictions for other models with logits
(the Fisher), and a random projection of the output otherwise (Gauss-Newton). The planner
multiplies each site's output error by it (``importance`` of `make_plan`).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..sites import Site

_LSTM_ATTR = re.compile(r"weight_(ih|hh)_l(\d+)")


class InputMoments(dict[str, Tensor]):
    """``{site name: E[x x^T]}`` (float64) over all calibration rows; ``folds`` holds the same over
    the even-numbered and the odd-numbered batches (float32), for held-out error estimates (empty
    with fewer than two batches)."""

    folds: dict[str, tuple[Tensor, Tensor]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.folds = {}


class _Moments:
    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}
        self.even: dict[str, Tensor] = {}  # the sums and rows of the even-numbered batches
        self.even_rows: dict[str, int] = {}
        self.parity = 0
        self._last: tuple[Tensor, int, Tensor, str] | None = None  # the last input seen, its version, X^T X, by whom
        self.sources: dict[str, set[str]] = {}  # name -> the sites whose X^T X it added (itself when computed)

    def add(self, name: str, x: Tensor, dim: int) -> None:
        if x.shape[-1] != dim:
            warnings.warn(f"input of {name} has {x.shape[-1]} features, expected {dim}; skipped", stacklevel=3)
            return
        if self._last is not None and self._last[0] is x and self._last[1] == x._version:
            xtx, source = self._last[2], self._last[3]
        else:
            x2 = x.detach().reshape(-1, dim)
            x2 = x2.float() if x2.dtype != torch.float64 else x2
            xtx = (x2.T @ x2).to(device="cpu", dtype=torch.float64)  # one batch in float32, sums in float64
            self._last, source = (x, x._version, xtx, name), name
        self.sources.setdefault(name, set()).add(source)
        rows = x.numel() // dim
        if name in self.sums:
            self.sums[name] += xtx
            self.rows[name] += rows
        else:
            self.sums[name] = xtx.clone()
            self.rows[name] = rows
        if self.parity == 0:
            if name in self.even:
                self.even[name] += xtx
                self.even_rows[name] += rows
            else:
                self.even[name] = xtx.clone()
                self.even_rows[name] = rows

    def _alias(self, name: str) -> str | None:
        """The site whose moments ``name``'s equal bit for bit (it added exactly that site's products), or None."""
        src = self.sources.get(name, set())
        lead = next(iter(src)) if len(src) == 1 else None
        if lead is None or lead == name or self.sources.get(lead) != {lead} or self.rows[lead] != self.rows[name]:
            return None
        if self.even_rows.get(lead) != self.even_rows.get(name) or not torch.equal(self.sums[lead], self.sums[name]):
            return None
        return lead

    def result(self) -> InputMoments:
        """The moments; sites that read the same input get the same tensor objects (q/k/v, gate/up), so that
        work done per Gram matrix downstream (a GPTQ inverse, a rotation) can be shared by identity."""
        out = InputMoments({name: s / self.rows[name] for name, s in self.sums.items() if self.rows[name] > 0})
        for name, even in self.even.items():
            a, total = self.even_rows[name], self.rows[name]
            if name in out and 0 < a < total:
                out.folds[name] = ((even / a).float(), ((self.sums[name] - even) / (total - a)).float())
        for name in list(out):
            lead = self._alias(name)
            if lead is not None and lead in out:
                out[name] = out[lead]
                if lead in out.folds:
                    out.folds[name] = out.folds[lead]
        return out


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
) -> InputMoments:
    """``{site name: E[x x^T]}`` (float64, CPU, ``(in, in)``) over the rows of every batch, with
    the even and odd batches' moments in ``.folds`` (see `InputMoments`).

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
                call_model(model, batch)
                acc._last = None
                acc.parity ^= 1
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return acc.result()


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model`` on one calibration batch: ``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple
    or list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _input_ids(batch: Any) -> Tensor | None:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if isinstance(ids, (tuple, list)) and ids:
        ids = ids[0]
    return ids if isinstance(ids, Tensor) and not ids.is_floating_point() and not ids.is_complex() else None


def fisher_loss(output: Any, batch: Any, generator: torch.Generator) -> Tensor:
    """A scalar whose gradient ``g`` gives the sensitivity through ``E[g gᵀ]``.

    * logits ``(B, T, V)`` over input ids ``(B, T)`` (a causal language model): the summed
      next-token cross-entropy on the batch itself (empirical Fisher): on a real language model it
      allocates far better than the sampled Fisher below (``benchmarks/results/design_measurements.md``);
    * other logits: cross-entropy against labels sampled from the model's own predictions (Fisher);
    * other outputs: a standard normal projection of the first floating-point tensor (``J Jᵀ``).
    """
    logits = getattr(output, "logits", None)
    ids = _input_ids(batch)
    if (
        isinstance(logits, Tensor) and logits.is_floating_point() and logits.dim() == 3 and ids is not None
        and tuple(ids.shape) == tuple(logits.shape[:2]) and ids.shape[1] > 1
    ):
        flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        return torch.nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1).to(flat.device), reduction="sum")
    if isinstance(logits, Tensor) and logits.is_floating_point():
        flat = logits.reshape(-1, logits.shape[-1]).float()
        with torch.no_grad():
            probs = torch.softmax(flat, -1).cpu()
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(flat.device)
        return torch.nn.functional.cross_entropy(flat, labels, reduction="sum")
    tensor = output
    if not isinstance(tensor, Tensor):
        tensor = getattr(output, "last_hidden_state", None)
    if not isinstance(tensor, Tensor) and isinstance(output, (tuple, list)):
        tensor = next((t for t in output if isinstance(t, Tensor) and t.is_floating_point()), None)
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        raise ValueError(f"cannot measure sensitivity: the model returned {type(output).__name__}, no logits or tensor")
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.device, tensor.dtype)
    return (tensor * noise).sum()


def collect_sensitivity(
    model: nn.Module,
    sites: Sequence[Site],
    batches: Iterable[Any],
    max_batches: int | None = 2,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """``{site name: κ}``: the mean squared loss gradient per output feature and token at each site.

    The loss is `fisher_loss` of the model's output on each of the first ``max_batches`` batches
    (called as in `collect_input_moments`); sampled labels or projections use a generator seeded by
    ``seed``.
    Gradients are taken with respect to the outputs of the modules owning ``linear`` and ``conv1d``
    sites only (no parameter gradients are formed; the owners' parameters require grad for the
    duration). Other sites, and sites whose module did not run, are absent. A backward pass costs
    about two forward passes.
    """
    groups: dict[str, list[Site]] = {}
    for site in sites:
        if site.kind in ("linear", "conv1d"):
            groups.setdefault(site.owner, []).append(site)
    outputs: dict[str, list[Tensor]] = {}
    handles, flags = [], []

    def hook(owner: str) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, Tensor) and output.requires_grad:
                outputs.setdefault(owner, []).append(output)

        return fn

    for owner in groups:
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        for param in module.parameters(recurse=False):
            flags.append((param, param.requires_grad))
            param.requires_grad_(True)
        handles.append(module.register_forward_hook(hook(owner)))
    sums: dict[str, float] = {}
    rows: dict[str, int] = {}
    generator = torch.Generator().manual_seed(seed)
    training = model.training
    batches = list(batches)[:max_batches] if max_batches is not None else list(batches)
    try:
        model.eval()
        with torch.enable_grad():
            for batch in tqdm(batches, desc="kronc: sensitivity", unit="batch", disable=not progress):
                outputs.clear()
                loss = fisher_loss(call_model(model, batch), batch, generator)
                owners = [o for o in outputs for _ in outputs[o]]
                tensors = [t for o in outputs for t in outputs[o]]
                grads = torch.autograd.grad(loss, tensors, allow_unused=True) if tensors else ()
                for owner, grad in zip(owners, grads, strict=True):
                    if grad is None:
                        continue
                    g2 = float(grad.detach().float().square().sum(dtype=torch.float64))
                    sums[owner] = sums.get(owner, 0.0) + g2
                    rows[owner] = rows.get(owner, 0) + grad.numel() // grad.shape[-1]
                del loss, tensors, grads
    finally:
        outputs.clear()
        for h in handles:
            h.remove()
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(training)
    out = {}
    for owner, group in groups.items():
        if rows.get(owner):
            for site in group:
                kappa = sums[owner] / (rows[owner] * site.shape[0])
                if math.isfinite(kappa):
                    out[site.name] = kappa
    return out
