"""The example inputs a graph was captured with, stored beside a save so `load` can capture it again.

Exported graphs are specialised to their inputs' structure, so a graph output is rebuilt by
re-capturing the architecture with the same positional or keyword tensors (and plain values).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..state_dicts import unshared
from .files import KroncFileError, first_line


def save_examples(examples: Any, file: Path) -> dict[str, Any] | None:
    """Write the tensors of ``examples`` to ``file``; the returned spec (for the manifest) says where each went.

    Returns None (nothing stored) for inputs that are not tensors, plain values, or a tuple/dict of them.
    """
    from safetensors.torch import save_file

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    if isinstance(examples, Tensor):
        args, kwargs = (examples,), {}
    elif isinstance(examples, Mapping):
        args, kwargs = (), dict(examples)
    elif isinstance(examples, tuple) and len(examples) == 2 and isinstance(examples[1], Mapping):
        args, kwargs = tuple(examples[0]), dict(examples[1])
    elif isinstance(examples, (tuple, list)):
        args, kwargs = tuple(examples), {}
    else:
        return None
    tensors: dict[str, Tensor] = {}
    spec: dict[str, Any] = {"args": [], "kwargs": {}}
    for i, a in enumerate(args):
        if not isinstance(a, Tensor):
            return None
        tensors[f"args.{i}"] = a.detach().cpu().contiguous()
        spec["args"].append(f"args.{i}")
    for k, v in kwargs.items():
        if isinstance(v, Tensor):
            tensors[f"kwargs.{k}"] = v.detach().cpu().contiguous()
            spec["kwargs"][k] = {"tensor": f"kwargs.{k}"}
        elif v is None or isinstance(v, (bool, int, float, str)):
            spec["kwargs"][k] = {"value": v}
        else:
            return None
    if tensors:
        save_file(unshared(tensors), str(file))
    return spec


def load_examples(file: Path, spec: Mapping[str, Any]) -> dict[str, Any] | tuple[Any, ...]:
    """The example inputs ``save_examples`` stored, as positional args or keyword args."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file)) if file.is_file() else {}
        args = tuple(tensors[name] for name in spec.get("args", []))
        kwargs = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in spec.get("kwargs", {}).items()}
    except (SafetensorError, OSError, KeyError, TypeError) as e:
        raise KroncFileError(f"{file} is missing, corrupted or truncated: {first_line(e)}") from e
    if args and not kwargs:
        return args
    if kwargs and not args:
        return kwargs
    raise KroncFileError(f"{file}: kronc re-captures graphs from positional or keyword example inputs, not both")
