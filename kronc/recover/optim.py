"""Which student parameters train, and the optimizer and learning-rate schedule that train them."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..formats import Factorized
from ..values import QuantizedTensor
from .config import RecoveryConfig, Trainable

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or "norm" in type(module).__name__.lower()


def _is_bias(name: str) -> bool:
    parts = name.split(".")
    return parts[-1].startswith("bias") or (len(parts) > 1 and parts[-1].isdigit() and parts[-2].startswith("bias"))


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """``name -> "factor" | "scale" | "latent" | "norm" | "bias" | "other"`` for every (deduplicated) parameter of
    ``model``.

    Factors are the tensors of `Factorized` weights (every compressed format, and the dense matrices
    that compressed LSTMs keep as `Dense`); scales are the quantization scales and minima that train
    during recovery (`kronc.recover.scales`); latent weights are the fake-quantized weights a block of
    block-wise reconstruction trains (`kronc.values.latent`; never selected by ``trainable``); norms are the parameters of normalisation layers (any module
    whose class name contains "Norm"); biases are parameters named ``bias*``.
    """
    quantized = [m for m in model.modules() if isinstance(m, QuantizedTensor)]
    latent = {id(m.latent_train) for m in quantized if m.trains_latent}
    scales = {id(p) for m in quantized for p in m.parameters()} - latent
    factors = {id(p) for m in model.modules() if isinstance(m, Factorized) for p in m.parameters()}
    norms = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    roles: dict[str, str] = {}
    for name, p in model.named_parameters():
        if id(p) in latent:
            roles[name] = "latent"
        elif id(p) in scales:
            roles[name] = "scale"
        elif id(p) in factors:
            roles[name] = "factor"
        elif id(p) in norms:
            roles[name] = "norm"
        elif _is_bias(name):
            roles[name] = "bias"
        else:
            roles[name] = "other"
    return roles


TRAINED_ROLES: dict[str, set[str]] = {
    "factors": {"factor", "scale"},
    "factors+norms": {"factor", "scale", "norm"},
    "factors+norms+biases": {"factor", "scale", "norm", "bias"},
    "scales+norms+biases": {"scale", "norm", "bias"},
    "norms+biases": {"norm", "bias"},
    "all": {"factor", "scale", "norm", "bias", "other"},
}


def trainable_parameters(model: nn.Module, which: Trainable) -> dict[str, nn.Parameter]:
    """The parameters ``which`` selects, by name (tied parameters once)."""
    roles = parameter_roles(model)
    keep = TRAINED_ROLES[which]
    params = dict(model.named_parameters())
    return {name: params[name] for name, role in roles.items() if role in keep}


def make_optimizer(model: nn.Module, params: dict[str, nn.Parameter], config: RecoveryConfig) -> torch.optim.AdamW:
    """AdamW over ``params``; weight decay on factors and other matrices, never on scales, norms or biases;
    latent weights at ``blockwise.latent_lr`` (grid steps), without decay."""
    roles = parameter_roles(model)
    decay = [p for n, p in params.items() if roles[n] in ("factor", "other")]
    no_decay = [p for n, p in params.items() if roles[n] in ("scale", "norm", "bias")]
    latent = [p for n, p in params.items() if roles[n] == "latent"]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": latent, "weight_decay": 0.0, "lr": config.blockwise.latent_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def lr_factor(step: int, config: RecoveryConfig) -> float:
    """Multiplier of ``lr`` at ``step``: linear warmup, then cosine, linear or no decay to ``steps``."""
    warm = round(config.warmup * config.steps)
    if step < warm:
        return (step + 1) / warm
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, config.steps - warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress


def make_scheduler(optimizer: torch.optim.Optimizer, config: RecoveryConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, config)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
