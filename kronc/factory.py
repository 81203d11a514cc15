"""``package.module:factory`` strings: the one way a user names an architecture by text.

Used by `kronc.serialize.load` (a saved plain model's uncompressed architecture) and by the tools'
model resolution; kronc's own names (``toy:NAME``, built-in models) are resolved by `kronc.tools`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

from .errors import ModelSpecError


def call_factory(spec: str) -> tuple[nn.Module, Any]:
    """The module (and tokenizer, when the factory returns ``(model, tokenizer)``) that ``spec`` names."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"cannot read {spec!r}: write package.module:factory")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSpecError(f"cannot import {module_name!r} (from {spec!r}): {_first_line(e)}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj, None
    if not callable(obj):
        raise ModelSpecError(f"{spec} is a {type(obj).__name__}, not an nn.Module or a factory")
    if inspect.isclass(obj) and not issubclass(obj, nn.Module):
        raise ModelSpecError(f"{spec} is the class {obj.__name__}, not an nn.Module")
    try:  # a factory takes no arguments; anything else (os:system, json:dumps, builtins:exit) is refused here
        built = obj()
    except TypeError as e:
        raise ModelSpecError(f"{spec} is not a zero-argument factory: calling {attr}() failed: {_first_line(e)}") from e
    except SystemExit as e:
        raise ModelSpecError(f"{spec}() tried to exit the program (code {e.code!r}); it is not a model factory") from e
    tokenizer = None
    if isinstance(built, tuple) and len(built) == 2:
        built, tokenizer = built
    if not isinstance(built, nn.Module):
        raise ModelSpecError(f"{spec}() returned a {type(built).__name__}, not an nn.Module")
    return built, tokenizer


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
