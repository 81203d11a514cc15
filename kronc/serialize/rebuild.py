"""Rebuild a saved model's structure: its architecture, with empty formats of the planned shapes swapped in.

`load` fills the result with the stored tensors; nothing here fits or decomposes a weight.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture import capture
from ..errors import MissingPackageError
from ..factory import call_factory
from ..formats import FORMATS, Factorized, FormatError, FormatSpec, format_module
from ..pipeline import materialize
from ..plan import Plan
from ..sites import Site, site_of_parameter
from .files import MANIFEST, KroncFileError, ModelArg, first_line


def empty_format(spec: FormatSpec, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> Factorized:
    """A format of ``spec``'s structure for a ``shape`` weight, with uninitialised values (no fitting).

    Sparse positions are placeholders; loading a state dict replaces values and positions. Unknown
    format kinds raise `KroncFileError` naming the kinds this kronc knows.
    """
    try:
        module = format_module(spec.kind)
    except FormatError as e:
        raise KroncFileError(f"unknown format kind {spec.kind!r}; this kronc knows {', '.join(FORMATS)}") from e
    spec.check(shape)
    return module.empty(spec, shape, dtype)


def rebuild_modules(model: nn.Module, plan: Plan) -> nn.Module:
    """Swap empty compressed modules in, site by site, without tracing the model."""
    sites = {}
    for d in plan.decisions:
        try:
            site = site_of_parameter(model, d.site)
        except ValueError as e:
            raise KroncFileError(f"{e} (was the model saved from a different architecture?)") from e
        if site.shape != tuple(d.shape):
            raise KroncFileError(
                f"site {d.site} is {site.shape[0]}x{site.shape[1]} in this {type(model).__name__} but "
                f"{d.shape[0]}x{d.shape[1]} in the saved plan: load it into the architecture it was compressed from"
            )
        sites[d.site] = site
    return materialize(plan, sites, _empty, model=model)


def _empty(site: Site, spec: FormatSpec) -> Factorized:
    return empty_format(spec, site.shape, site.dtype)


def rebuild_graph(model: nn.Module, plan: Plan, example_inputs: Any) -> nn.Module:
    """Capture the architecture again and rewrite its graph with empty formats."""
    captured = capture(model, example_inputs)
    sites = {s.name: s for s in captured.sites}
    try:
        return materialize(plan, sites, _empty, graph=copy.deepcopy(captured.graph_module))
    except (KeyError, ValueError) as e:
        raise KroncFileError(f"the saved plan does not fit the captured {type(model).__name__}: {first_line(e)}") from e


def base_model(path: Path, manifest: Mapping[str, Any], model: ModelArg) -> nn.Module:
    if model is None and manifest.get("huggingface"):
        return hf_model(path, manifest)
    if model is None:  # kronc.load (kronc.tools.resolve_model.load) rebuilds toy:NAME and built-in sources first
        source = manifest.get("source")
        # `source` and `model_class` come from the (untrusted) manifest: quoted as data, never as code to run
        recorded = f" (the save records its source as {source!r}; check it before using it)" if source else ""
        raise KroncFileError(
            f"{path} holds a {str(manifest['model_class'])!r}, which kronc cannot rebuild by itself: pass its "
            f"uncompressed architecture, kronc.load(path, model=MyModel() or model=factory){recorded}"
        )
    if isinstance(model, str):
        return call_factory(model)[0]
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        built = model()
        if isinstance(built, tuple):
            built = built[0]
        if not isinstance(built, nn.Module):
            raise TypeError(f"the model factory returned a {type(built).__name__}, not an nn.Module")
        return built
    raise TypeError(f"model must be an nn.Module, a factory or a 'package.module:factory' string, got {type(model).__name__}")


def hf_model(path: Path, manifest: Mapping[str, Any]) -> nn.Module:
    try:
        import transformers
    except ImportError as e:
        raise MissingPackageError(f"{path} holds a Hugging Face model; run: pip install 'transformers>=5.0'") from e
    cls_name = str(manifest["model_class"]).rsplit(".", 1)[-1]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise KroncFileError(f"{path}: transformers {transformers.__version__} has no class {cls_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        # the manifest is untrusted: never call an arbitrary transformers attribute (pipeline, Trainer...)
        raise KroncFileError(f"{path / MANIFEST}: model_class {cls_name!r} is not a transformers PreTrainedModel class")
    if not (path / "config.json").is_file():
        raise KroncFileError(f"{path}: config.json is missing (needed to rebuild the {cls_name})")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise KroncFileError(f"{path / 'config.json'} cannot be read: {first_line(e)}") from e
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        model = cls(config)
    else:
        with no_init_weights():  # every stored weight is overwritten: skip the random init
            model = cls(config)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # no_init_weights skips tying too
    if (path / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(path))
    return model.eval()
