"""The recovery losses: output distillation, intermediate-layer distillation and next-token cross-entropy.

`Distiller` runs the teacher (no grad) and the student on a batch and returns the unweighted loss
parts; `weighted_total` combines them with the `RecoveryConfig` weights. Every part is scale-free
or per token, so the weights mean the same on any model:

* ``kd``: ``T² · KL(softmax(teacher/T) || softmax(student/T))`` per position, or for outputs that are
  not logits the relative squared error per position ``||s - t||² / ||t||²``, averaged;
* ``hidden``: the same per-position relative squared error of each matched hidden state, averaged
  over positions and layers;
* ``lm``: next-token cross-entropy in nats per predicted token.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batches import IGNORE, Batch
from .config import RecoveryConfig, RecoveryError

OutputKind = Literal["logits", "hidden"]


def model_output(out: Any) -> tuple[Tensor, OutputKind]:
    """The tensor a model's output is compared by, and whether it is logits or hidden states.

    A tensor, or the first tensor of a tuple, is taken as logits; a Hugging Face ``ModelOutput`` (or a
    dict) gives ``logits`` when it has them, else ``last_hidden_state``.
    """
    if isinstance(out, Tensor):
        return out, "logits"
    for key, kind in (("logits", "logits"), ("last_hidden_state", "hidden")):
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, Tensor):
            return value, kind  # type: ignore[return-value]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0], "logits"
    raise RecoveryError(f"cannot find the output tensor in a {type(out).__name__}: the model should return a "
                        "tensor, a tuple starting with one, or an object with .logits or .last_hidden_state")


def hidden_states(out: Any) -> tuple[Tensor, ...] | None:
    """The per-layer hidden states of a Hugging Face output (``output_hidden_states=True``), if any."""
    states = out.get("hidden_states") if isinstance(out, Mapping) else getattr(out, "hidden_states", None)
    if isinstance(states, (tuple, list)) and states and all(isinstance(h, Tensor) for h in states):
        return tuple(states)
    return None


def kl_loss(student: Tensor, teacher: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    """``T² · KL(teacher || student)`` of the softened distributions over the last dim, mean per position."""
    t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    per_position = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    return _masked_mean(per_position, mask) * temperature**2


def relative_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per position ``||s - t||² / ||t||²`` over the last dim, averaged: 0 is a perfect match, 1 as far as zeros.

    Normalised per position, not by the batch's total energy: decoder hidden states carry "massive
    activations" (most of a layer's squared norm in the first token; figures in
    ``benchmarks/results/design_measurements.md``), and a batch-level ratio would spend nearly all of
    its gradient on that one position.
    """
    t = teacher.detach().float()
    if t.dim() <= 1:
        return _masked_mean((student.float() - t).pow(2), mask) / _masked_mean(t.pow(2), mask).clamp_min(1e-12)
    err = (student.float() - t).pow(2).sum(-1)
    scale = t.pow(2).sum(-1)
    floor = (scale.mean() * 1e-6).clamp_min(1e-12)  # an all-zero position counts as absolute error
    return _masked_mean(err / scale.clamp_min(floor), mask)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Next-token cross-entropy (nats per predicted token); `IGNORE` targets are skipped."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None or mask.shape != x.shape[: mask.dim()]:
        return x.mean()
    m = mask.to(x.dtype).reshape(*mask.shape, *([1] * (x.dim() - mask.dim()))).expand_as(x)
    return (x * m).sum() / m.sum().clamp_min(1)


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    return model_output(out)[0]


class ModuleOutputs:
    """Forward hooks that record the outputs of named modules (the first tensor of tuple outputs)."""

    def __init__(self, model: nn.Module, names: list[str], who: str) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise RecoveryError(f"the {who} has no module {missing[0]!r} (hidden_modules names modules by "
                                f"their names in model.named_modules())")
        self.outputs: dict[str, Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]
        self.names = names

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self.outputs[name] = _first_tensor(out)

        return hook

    def take(self) -> list[Tensor]:
        outs = [self.outputs.pop(n) for n in self.names if n in self.outputs]
        if len(outs) != len(self.names):
            ran = ", ".join(self.outputs) or "none"
            raise RecoveryError(f"hidden_modules: only some of the named modules ran in a forward pass (ran: {ran})")
        return outs

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def is_huggingface(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "output_hidden_states")


def takes_argument(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` names the argument ``name`` (``use_cache`` is passed only where it is)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class Distiller:
    """Computes the loss parts of `RecoveryConfig` for a student against its teacher.

    Hidden states come from ``hidden_modules`` (forward hooks) when named, else from Hugging Face
    ``output_hidden_states=True`` when both models are Hugging Face models, else the ``hidden`` part is
    left out (`has_hidden` is False). Call `close` to remove the hooks.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, config: RecoveryConfig) -> None:
        self.student, self.teacher, self.config = student, teacher, config
        pairs = [(p, p) if isinstance(p, str) else tuple(p) for p in config.hidden_modules]
        self.hooks: tuple[ModuleOutputs, ModuleOutputs] | None = None
        if pairs and config.hidden > 0:
            t_hooks = ModuleOutputs(teacher, [t for t, _ in pairs], "teacher")
            try:
                self.hooks = (t_hooks, ModuleOutputs(student, [s for _, s in pairs], "student"))
            except RecoveryError:
                t_hooks.remove()
                raise
        self.pairs = pairs
        self.hf_hidden = not pairs and config.hidden > 0 and is_huggingface(student) and is_huggingface(teacher)
        self.has_hidden = bool(self.hooks) or self.hf_hidden
        self.extra = {"t": self._extra(teacher), "s": self._extra(student)}

    def _extra(self, model: nn.Module) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.hf_hidden:
            extra["output_hidden_states"] = True
        if takes_argument(model, "use_cache"):
            extra["use_cache"] = False
        return extra

    def close(self) -> None:
        if self.hooks:
            for h in self.hooks:
                h.remove()

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Unweighted loss parts (``kd``, ``hidden``, ``lm``: those with a positive weight) for ``batch``."""
        cfg = self.config
        t_device = _device(self.teacher)
        with torch.no_grad():
            t_batch = batch.to(t_device)
            t_out = self.teacher(*t_batch.args, **t_batch.kwargs, **self.extra["t"])
            t_hidden = self.hooks[0].take() if self.hooks else None
        s_out = self.student(*batch.args, **batch.kwargs, **self.extra["s"])
        s_hidden = self.hooks[1].take() if self.hooks else None
        t, t_kind = model_output(t_out)
        s, s_kind = model_output(s_out)
        if t.shape != s.shape:
            raise RecoveryError(f"the teacher's output has shape {tuple(t.shape)} but the student's {tuple(s.shape)}: "
                                "the teacher must be the model the student was compressed from")
        t = t.to(s.device)
        parts: dict[str, Tensor] = {}
        if cfg.kd > 0:
            kind = cfg.output_loss if cfg.output_loss != "auto" else ("mse" if s_kind == "hidden" else "kl")
            parts["kd"] = (kl_loss(s, t, cfg.temperature, batch.mask) if kind == "kl"
                           else relative_mse(s, t, batch.mask))
        if cfg.hidden > 0 and self.has_hidden:
            if self.hooks:
                pairs = list(zip(t_hidden or [], s_hidden or [], [f"{a} / {b}" for a, b in self.pairs], strict=True))
            else:
                pairs = self._hf_pairs(t_out, s_out)
            parts["hidden"] = torch.stack([self._hidden_term(th, sh, name, batch.mask) for th, sh, name in pairs]).mean()
        if cfg.lm > 0:
            if s_kind != "logits" or batch.targets is None or s.dim() < 2 or s.shape[:-1] != batch.targets.shape:
                shape = None if batch.targets is None else tuple(batch.targets.shape)
                raise RecoveryError(f"the lm loss needs next-token logits (batch, seq, vocab) and integer input ids; "
                                    f"the student returned {s_kind} of shape {tuple(s.shape)} for targets of shape "
                                    f"{shape}: set lm=0")
            parts["lm"] = lm_loss(s, batch.targets)
        return parts

    def _hf_pairs(self, t_out: Any, s_out: Any) -> list[tuple[Tensor, Tensor, str]]:
        t_states, s_states = hidden_states(t_out), hidden_states(s_out)
        if t_states is None or s_states is None:
            raise RecoveryError("a Hugging Face model returned no hidden_states with output_hidden_states=True; "
                                "name hidden_modules or set hidden=0")
        if len(t_states) != len(s_states):
            raise RecoveryError(f"the teacher returned {len(t_states)} hidden states but the student "
                                f"{len(s_states)}: the teacher must be the model the student was compressed from")
        return [(t, s, f"hidden_states[{i}]") for i, (t, s) in enumerate(zip(t_states, s_states, strict=True))]

    @staticmethod
    def _hidden_term(teacher: Tensor, student: Tensor, name: str, mask: Tensor | None) -> Tensor:
        if teacher.shape != student.shape:
            raise RecoveryError(f"{name}: the teacher's hidden state has shape {tuple(teacher.shape)} but the "
                                f"student's {tuple(student.shape)}")
        return relative_mse(student, teacher.to(student.device), mask)


def weighted_total(parts: Mapping[str, Tensor], config: RecoveryConfig) -> Tensor:
    """``kd·w_kd + hidden·w_hidden + lm·w_lm`` plus every other part (scheme penalties) as it is."""
    weights = {"kd": config.kd, "hidden": config.hidden, "lm": config.lm}
    terms = [value * weights.get(name, 1.0) for name, value in parts.items()]
    return torch.stack([t.reshape(()).float() for t in terms]).sum()


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
