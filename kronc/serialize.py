"""Save and load compressed models: safetensors weights plus a JSON manifest (plan, policy, versions).

A saved directory holds:

* ``kronc.json``: the manifest: the file format version, the kronc/torch/transformers versions
  that wrote it, the model class, whether the model is a module or an fx graph, the plan, the
  policy, and the size and SHA-256 of the weights file;
* ``model.safetensors``: every tensor of the compressed model, tied tensors stored once;
* ``config.json`` and ``generation_config.json``: for Hugging Face models;
* tokenizer files, when `save` was given a tokenizer;
* ``example_inputs.safetensors``: the inputs a graph was captured with, when known.

`load` rebuilds the architecture (from the saved config for Hugging Face models, otherwise from
what the caller passes), installs *empty* formats of the planned structure (no fitting, no SVD)
and loads the stored tensors into them: nothing is recompressed, and outputs match the saved model
bit for bit. A missing, corrupted or truncated file, or one from an unknown format version,
raises `KroncFileError` with a one-line message.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn

from .capture import capture
from .errors import MissingPackageError
from .factory import call_factory
from .formats import FORMATS, Factorized, FormatError, FormatSpec, SparseIndex, format_module
from .pipeline import materialize
from .plan import Plan
from .scale.shards import read_shards
from .sites import Site, site_of_parameter
from .state_dicts import alias_map, dedupe, stored_bytes, unshared

FORMAT_VERSION = 1
"""Version of the saved-directory layout; `load` refuses any other."""
MANIFEST = "kronc.json"
WEIGHTS = "model.safetensors"
EXAMPLES = "example_inputs.safetensors"

ModelArg = nn.Module | Callable[[], nn.Module] | str | None


class KroncFileError(ValueError):
    """A saved kronc model cannot be read: missing, corrupted, truncated, from an unknown format
    version, or not matching the architecture it is loaded into."""


# --------------------------------------------------------------------------- save


def save(
    model: nn.Module,
    path: str | Path,
    *,
    tokenizer: Any = None,
    source: str | None = None,
    example_inputs: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a compressed model (one returned by `kronc.compile` or `kronc.apply`) to directory ``path``.

    ``tokenizer`` (a Hugging Face tokenizer) is saved beside it. ``source`` records how the
    uncompressed architecture was named (e.g. ``"toy:llama"`` or ``"pkg.module:factory"``), so
    `load` and the ``kronc`` command can rebuild plain modules. ``example_inputs`` (default: the
    model's ``kronc_example_inputs``) are stored for re-capturing exported graphs.

    The folder is written beside ``path`` and renamed into place: an earlier save at ``path`` is
    replaced whole (no stale file survives) and stays intact if writing fails. A non-empty folder
    that is not a kronc save is refused unless ``overwrite=True``.
    """
    plan: Plan | None = getattr(model, "kronc_plan", None)
    if plan is None:
        raise ValueError("this model carries no kronc plan: save models returned by kronc.compile or kronc.apply")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and not overwrite and not (path / MANIFEST).is_file() and any(path.iterdir()):
        raise FileExistsError(f"{path} is a non-empty folder that is not a kronc save: choose another path "
                              "or pass overwrite=True to replace everything in it")
    # Everything is written to a sibling folder and renamed into place, so an interruption (kill,
    # Ctrl-C, a full disk) leaves the earlier contents of `path` whole, and no stale file survives.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.kronc-tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        _write_save(model, plan, tmp, tokenizer=tokenizer, source=source, example_inputs=example_inputs)
        _replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _replace_dir(new: Path, path: Path) -> None:
    """Move the finished folder ``new`` to ``path``; an earlier ``path`` is removed only once ``new`` is there."""
    if not path.exists():
        os.replace(new, path)
        return
    old = path.parent / f".{path.name}.kronc-old-{secrets.token_hex(6)}"
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_save(model: nn.Module, plan: Plan, path: Path, *, tokenizer: Any, source: str | None,
                example_inputs: Any) -> None:
    """Write every file of a save into the (new, empty) folder ``path``; the manifest last."""
    from safetensors.torch import save_file

    is_graph = isinstance(model, fx.GraphModule)
    config = getattr(model, "config", None)
    is_hf = config is not None and hasattr(config, "to_json_file") and not is_graph
    if is_hf:
        config.to_json_file(str(path / "config.json"))
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "to_json_file"):
            generation.to_json_file(str(path / "generation_config.json"))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(path))

    state = dedupe(model.state_dict())
    save_file(unshared(state), str(path / WEIGHTS), metadata={"kronc_format_version": str(FORMAT_VERSION)})
    (path / EXAMPLES).unlink(missing_ok=True)
    examples = example_inputs if example_inputs is not None else getattr(model, "kronc_example_inputs", None)
    example_spec = _save_examples(examples, path / EXAMPLES) if is_graph and examples is not None else None

    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
    manifest = {
        "format_version": FORMAT_VERSION,
        "versions": {name: _version(name) for name in ("kronc", "torch", "transformers", "safetensors")},
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "huggingface": is_hf,
        "output": "graph" if is_graph else "module",
        "source": source,
        "dtype": dtypes[0] if len(dtypes) == 1 else None,
        "weights": {"file": WEIGHTS, "bytes": (path / WEIGHTS).stat().st_size, "sha256": _sha256(path / WEIGHTS),
                    "tensors": len(state)},
        "example_inputs": example_spec,
        "plan": plan.model_dump(mode="json"),
        "policy": getattr(model, "kronc_policy", None),
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))


# --------------------------------------------------------------------------- load


def load(
    path: str | Path,
    model: ModelArg = None,
    *,
    example_inputs: Any = None,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a model saved with `save`, without recompressing it.

    Hugging Face models are rebuilt from their saved config (same class; ``generate()`` works).
    Other models need ``model``: the uncompressed architecture as an instance (used and modified
    in place), a zero-argument factory, or a ``"package.module:factory"`` / ``"toy:NAME"`` string;
    a model saved with ``source="toy:NAME"`` or a built-in name (`kronc.tools.zoo.BUILTIN_MODELS`) is
    rebuilt by itself when loaded through `kronc.load` (`kronc.tools.resolve_model.load`). Graph outputs are re-captured from that architecture, which for exported
    models needs the example inputs they were captured with (stored in the directory when known,
    else ``example_inputs``, else Hugging Face dummy inputs). ``verify=False`` skips the SHA-256
    check of the weights file.

    Raises `KroncFileError` when the directory is missing, corrupted, truncated, from another file
    format version, or does not match the architecture.
    """
    path = _directory(path)
    manifest = read_manifest(path)
    try:
        plan = Plan.model_validate(manifest["plan"])
    except Exception as e:
        raise KroncFileError(f"{path / MANIFEST}: the plan is invalid: {_first_line(e)}") from e
    state = read_weights(path, manifest, verify=verify)
    base = _base_model(path, manifest, model)
    dtype = _dtype(manifest.get("dtype"))
    if dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in base.parameters()):
        base = base.to(dtype)
    if manifest["output"] == "graph":
        if example_inputs is None and manifest.get("example_inputs"):
            example_inputs = _load_examples(path / EXAMPLES, manifest["example_inputs"])
        compressed = _rebuild_graph(base, plan, example_inputs)
    elif manifest["output"] == "module":
        compressed = _rebuild_modules(base, plan)
    else:
        raise KroncFileError(f"{path / MANIFEST}: unknown output kind {manifest['output']!r} (module or graph)")
    missing, unexpected, mismatched = _load_state(compressed, state)
    if missing or unexpected or mismatched:
        raise KroncFileError(
            f"{path / WEIGHTS} does not match the model rebuilt from its plan ({manifest['model_class']}): "
            + "; ".join(
                f"{what} {_few(keys)}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
                if keys
            )
        )
    _check_indices(compressed, path)
    compressed.eval()
    compressed.kronc_plan = plan  # type: ignore[assignment]
    compressed.kronc_policy = manifest.get("policy")  # type: ignore[assignment]
    compressed.kronc_source = manifest.get("source")  # type: ignore[assignment]
    return compressed


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a saved model, checked for a known format version and the required keys."""
    path = _directory(path)
    file = path / MANIFEST
    if not file.is_file():
        what = "does not exist" if not path.exists() else f"is not a saved kronc model: {MANIFEST} is missing"
        raise KroncFileError(f"{path} {what}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KroncFileError(f"{file} is corrupted or truncated: {e}") from e
    if not isinstance(manifest, dict):
        raise KroncFileError(f"{file} is corrupted: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise KroncFileError(f"{file} has no valid format_version (got {version!r}); it was not written by kronc.save")
    if version != FORMAT_VERSION:
        newer = "a newer kronc: upgrade kronc to read it" if version > FORMAT_VERSION else "an older kronc"
        raise KroncFileError(
            f"{file} has file format version {version}, written by {newer}; "
            f"this kronc ({_version('kronc')}) reads version {FORMAT_VERSION} only"
        )
    for key in ("plan", "model_class", "output"):
        if key not in manifest:
            raise KroncFileError(f"{file} is corrupted: the key {key!r} is missing")
    return manifest


def read_weights(path: str | Path, manifest: Mapping[str, Any] | None = None, *, verify: bool = True) -> dict[str, Tensor]:
    """The stored tensors, after checking the file's size and (``verify``) checksum against the manifest."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _directory(path)
    manifest = read_manifest(path) if manifest is None else manifest
    shards = (manifest.get("weights") or {}).get("shards")
    if isinstance(shards, list):  # a sharded save (streamed compile): one file per block
        return read_shards(path, shards, verify=verify, error=KroncFileError)
    file = path / WEIGHTS
    if not file.is_file():
        raise KroncFileError(f"{path}: {WEIGHTS} is missing")
    expected = manifest.get("weights") or {}
    size = file.stat().st_size
    if isinstance(expected.get("bytes"), int) and size != expected["bytes"]:
        what = "truncated" if size < expected["bytes"] else "corrupted"
        raise KroncFileError(f"{file} is {what}: {size} bytes, the manifest says {expected['bytes']}")
    if verify and not isinstance(expected.get("sha256"), str):
        raise KroncFileError(f"{path / MANIFEST} has no SHA-256 checksum for {WEIGHTS}: it was altered or not written "
                             "by kronc.save (load it with verify=False to skip the check)")
    if verify and _sha256(file) != expected["sha256"]:
        raise KroncFileError(f"{file} is corrupted: its SHA-256 does not match the manifest")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise KroncFileError(f"{file} is corrupted or truncated: {_first_line(e)}") from e


# --------------------------------------------------------------------------- empty formats


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


# --------------------------------------------------------------------------- rebuilding


def _rebuild_modules(model: nn.Module, plan: Plan) -> nn.Module:
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


def _rebuild_graph(model: nn.Module, plan: Plan, example_inputs: Any) -> nn.Module:
    """Capture the architecture again and rewrite its graph with empty formats."""
    captured = capture(model, example_inputs)
    sites = {s.name: s for s in captured.sites}
    try:
        return materialize(plan, sites, _empty, graph=copy.deepcopy(captured.graph_module))
    except (KeyError, ValueError) as e:
        raise KroncFileError(f"the saved plan does not fit the captured {type(model).__name__}: {_first_line(e)}") from e


def _base_model(path: Path, manifest: Mapping[str, Any], model: ModelArg) -> nn.Module:
    if model is None and manifest.get("huggingface"):
        return _hf_model(path, manifest)
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


def _hf_model(path: Path, manifest: Mapping[str, Any]) -> nn.Module:
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
        raise KroncFileError(f"{path / 'config.json'} cannot be read: {_first_line(e)}") from e
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


# --------------------------------------------------------------------------- state dicts


def _load_state(model: nn.Module, stored: dict[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    state = model.state_dict()
    aliases = alias_map(state)
    full = {}
    for name in state:
        key = aliases.get(name, name)
        if key in stored:
            full[name] = stored[key]
    missing = [k for k in state if k not in full]
    used = {aliases.get(k, k) for k in full}
    unexpected = [k for k in stored if k not in used]
    mismatched = [f"{k} ({tuple(full[k].shape)} stored, {tuple(state[k].shape)} expected)"
                  for k in full if full[k].shape != state[k].shape]
    if not missing and not unexpected and not mismatched:
        for name, tensor in state.items():
            if full[name].dtype != tensor.dtype:
                raise KroncFileError(f"{name} is stored as {full[name].dtype} but the rebuilt model has {tensor.dtype}")
        model.load_state_dict(full, strict=True)
    return missing, unexpected, mismatched


def _check_indices(model: nn.Module, path: Path) -> None:
    """Sparse positions must be as many as the format stores values, inside the grid."""
    for name, mod in model.named_modules():
        if not isinstance(mod, SparseIndex):
            continue
        try:
            rows, cols = mod.decode()
        except Exception as e:
            raise KroncFileError(f"{path / WEIGHTS}: the sparse index {name} is corrupted: {_first_line(e)}") from e
        r, c = mod.grid
        bad = rows.numel() != mod.nnz or (rows.numel() and (int(rows.max()) >= r or int(cols.max()) >= c or int(cols.min()) < 0))
        if mod.encoding == "csr" and not bad:
            crow = mod.crow.long()
            bad = int(crow[0]) != 0 or int(crow[-1]) != mod.nnz or bool((crow[1:] < crow[:-1]).any())
        if bad:
            raise KroncFileError(f"{path / WEIGHTS}: the sparse index {name} is corrupted (positions outside its {r}x{c} grid "
                                 f"or not {mod.nnz} of them)")


# --------------------------------------------------------------------------- example inputs


def _save_examples(examples: Any, file: Path) -> dict[str, Any] | None:
    from safetensors.torch import save_file

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


def _load_examples(file: Path, spec: Mapping[str, Any]) -> dict[str, Any] | tuple[Any, ...]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file)) if file.is_file() else {}
        args = tuple(tensors[name] for name in spec.get("args", []))
        kwargs = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in spec.get("kwargs", {}).items()}
    except (SafetensorError, OSError, KeyError, TypeError) as e:
        raise KroncFileError(f"{file} is missing, corrupted or truncated: {_first_line(e)}") from e
    if args and not kwargs:
        return args
    if kwargs and not args:
        return kwargs
    raise KroncFileError(f"{file}: kronc re-captures graphs from positional or keyword example inputs, not both")


# --------------------------------------------------------------------------- helpers


def _directory(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name == MANIFEST and path.is_file() else path


def _dtype(name: object) -> torch.dtype | None:
    if not isinstance(name, str):
        return None
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _few(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


__all__ = [
    "FORMAT_VERSION", "KroncFileError", "empty_format", "load", "read_manifest", "read_weights", "save", "stored_bytes",
]
