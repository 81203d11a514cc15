"""`load` and the checks of a saved folder: its manifest, its weights file and its sparse indices.

Nothing is recompressed: the plan's structure is rebuilt with empty formats (`rebuild`) and the stored
tensors are loaded into it, so outputs match the saved model bit for bit. Every problem with the files
raises `KroncFileError` with a one-line message naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..formats import SparseIndex
from ..plan import Plan
from ..state_dicts import alias_map
from .examples import load_examples
from .files import (
    EXAMPLES,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    KroncFileError,
    ModelArg,
    directory,
    dtype_named,
    few,
    first_line,
    sha256,
    version,
)
from .rebuild import base_model, rebuild_graph, rebuild_modules
from .shards import check_shard_file, read_shards


def load(
    path: str | Path,
    model: ModelArg = None,
    *,
    example_inputs: Any = None,
    verify: bool = True,
    device: str | torch.device | None = None,
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

    ``device="meta"`` rebuilds the compressed structure (every compressed module, its parameters and buffers
    with their stored shapes and dtypes) on the meta device without reading a weight: the shards' sizes,
    checksums (``verify``) and headers are checked, and the model records its folder as ``kronc_folder``, so
    sharded recovery (`kronc.recover` with ``shard=True``) can shard it first and fill each rank's part from
    the files. Module saves only (a graph save is re-captured from real inputs).

    Raises `KroncFileError` when the directory is missing, corrupted, truncated, from another file
    format version, or does not match the architecture.
    """
    path = directory(path)
    manifest = read_manifest(path)
    try:
        plan = Plan.model_validate(manifest["plan"])
    except Exception as e:
        raise KroncFileError(f"{path / MANIFEST}: the plan is invalid: {first_line(e)}") from e
    if device is not None and torch.device(device).type == "meta":
        return _load_meta(path, manifest, plan, model, verify)
    if device is not None and torch.device(device).type != "cpu":
        raise KroncFileError(f"device must be 'cpu' or 'meta' (move the loaded model with .to()), got {device!r}")
    state = read_weights(path, manifest, verify=verify)
    base = base_model(path, manifest, model)
    dtype = dtype_named(manifest.get("dtype"))
    if dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in base.parameters()):
        base = base.to(dtype)
    if manifest["output"] == "graph":
        if example_inputs is None and manifest.get("example_inputs"):
            example_inputs = load_examples(path / EXAMPLES, manifest["example_inputs"])
        compressed = rebuild_graph(base, plan, example_inputs)
    elif manifest["output"] == "module":
        compressed = rebuild_modules(base, plan)
    else:
        raise KroncFileError(f"{path / MANIFEST}: unknown output kind {manifest['output']!r} (module or graph)")
    missing, unexpected, mismatched = load_state(compressed, state)
    if missing or unexpected or mismatched:
        raise KroncFileError(
            f"{path / WEIGHTS} does not match the model rebuilt from its plan ({manifest['model_class']}): "
            + "; ".join(
                f"{what} {few(keys)}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
                if keys
            )
        )
    check_indices(compressed, path)
    compressed.eval()
    compressed.kronc_plan = plan  # type: ignore[assignment]
    compressed.kronc_policy = manifest.get("policy")  # type: ignore[assignment]
    compressed.kronc_source = manifest.get("source")  # type: ignore[assignment]
    return compressed


def _load_meta(path: Path, manifest: Mapping[str, Any], plan: Plan, model: ModelArg, verify: bool) -> nn.Module:
    """`load` with ``device="meta"``: the rebuilt structure, checked against the stored headers, no storage."""
    if manifest["output"] != "module":
        raise KroncFileError(f"{path}: device='meta' loads module saves only; this one holds a {manifest['output']!r} "
                             "(load it whole)")
    layout = stored_layout(path, manifest, verify=verify)
    with torch.device("meta"):
        base = base_model(path, manifest, model).to("meta")
        dtype = dtype_named(manifest.get("dtype"))
        if dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in base.parameters()):
            base = base.to(dtype)
        compressed = rebuild_modules(base, plan)
    tensors = dict(compressed.state_dict(keep_vars=True))
    groups: dict[int, list[str]] = {}  # meta tensors have no storage to compare: ties are found by identity
    for name, t in tensors.items():
        groups.setdefault(id(t), []).append(name)
    missing = [g[0] for g in groups.values() if not any(n in layout for n in g)]
    unexpected = [k for k in layout if k not in tensors]
    mismatched = [f"{k} ({layout[k][1]} {layout[k][2]} stored, {list(tensors[k].shape)} {_name(tensors[k].dtype)} "
                  "expected)" for k in layout
                  if k in tensors and (layout[k][1] != list(tensors[k].shape) or layout[k][2] != _name(tensors[k].dtype))]
    if missing or unexpected or mismatched:
        raise KroncFileError(
            f"{path} does not match the model rebuilt from its plan ({manifest['model_class']}): "
            + "; ".join(f"{what} {few(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                                 ("wrong shape or dtype", mismatched)) if keys))
    compressed.eval()
    compressed.kronc_plan = plan  # type: ignore[assignment]
    compressed.kronc_policy = manifest.get("policy")  # type: ignore[assignment]
    compressed.kronc_source = manifest.get("source")  # type: ignore[assignment]
    compressed.kronc_folder = str(path)  # type: ignore[assignment]
    return compressed


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stored_layout(path: Path, manifest: Mapping[str, Any], *, verify: bool = True) -> dict[str, tuple[Path, list[int], str]]:
    """Every stored tensor's file, shape and dtype name (``"bfloat16"``), from the safetensors headers after the
    size and (``verify``) checksum checks of every file; no tensor data is loaded."""
    from safetensors import SafetensorError, safe_open

    shards = (manifest.get("weights") or {}).get("shards")
    if isinstance(shards, list):
        files = [check_shard_file(path, entry, verify=verify, error=KroncFileError) for entry in shards]
    else:
        files = [_check_single(path, manifest, verify)]
    layout: dict[str, tuple[Path, list[int], str]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if key in layout:
                        raise KroncFileError(f"{file} holds {key}, which another shard holds too")
                    info = f.get_slice(key)
                    kind = str(info.get_dtype())
                    layout[key] = (file, [int(n) for n in info.get_shape()], _DTYPES.get(kind, kind.lower()))
        except (SafetensorError, OSError) as e:
            raise KroncFileError(f"{file} is corrupted or truncated: {first_line(e)}") from e
    return layout


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
"""safetensors' dtype names -> torch's."""


def _check_single(path: Path, manifest: Mapping[str, Any], verify: bool) -> Path:
    """The single weights file of an unsharded save, checked for size and (``verify``) checksum."""
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
    if verify and sha256(file) != expected["sha256"]:
        raise KroncFileError(f"{file} is corrupted: its SHA-256 does not match the manifest")
    return file


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a saved model, checked for a known format version and the required keys."""
    path = directory(path)
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
    written = manifest.get("format_version")
    if not isinstance(written, int) or isinstance(written, bool):
        raise KroncFileError(f"{file} has no valid format_version (got {written!r}); it was not written by kronc.save")
    if written != FORMAT_VERSION:
        newer = "a newer kronc: upgrade kronc to read it" if written > FORMAT_VERSION else "an older kronc"
        raise KroncFileError(
            f"{file} has file format version {written}, written by {newer}; "
            f"this kronc ({version('kronc')}) reads version {FORMAT_VERSION} only"
        )
    for key in ("plan", "model_class", "output"):
        if key not in manifest:
            raise KroncFileError(f"{file} is corrupted: the key {key!r} is missing")
    return manifest


def read_weights(path: str | Path, manifest: Mapping[str, Any] | None = None, *, verify: bool = True) -> dict[str, Tensor]:
    """The stored tensors, after checking the file's size and (``verify``) checksum against the manifest."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory(path)
    manifest = read_manifest(path) if manifest is None else manifest
    shards = (manifest.get("weights") or {}).get("shards")
    if isinstance(shards, list):  # a sharded save (streamed compile): one file per block
        return read_shards(path, shards, verify=verify, error=KroncFileError)
    file = _check_single(path, manifest, verify)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise KroncFileError(f"{file} is corrupted or truncated: {first_line(e)}") from e


def load_state(model: nn.Module, stored: dict[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
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


def check_indices(model: nn.Module, path: Path) -> None:
    """Sparse positions must be as many as the format stores values, inside the grid."""
    for name, mod in model.named_modules():
        if not isinstance(mod, SparseIndex):
            continue
        try:
            rows, cols = mod.decode()
        except Exception as e:
            raise KroncFileError(f"{path / WEIGHTS}: the sparse index {name} is corrupted: {first_line(e)}") from e
        r, c = mod.grid
        bad = rows.numel() != mod.nnz or (rows.numel() and (int(rows.max()) >= r or int(cols.max()) >= c or int(cols.min()) < 0))
        if mod.encoding == "csr" and not bad:
            crow = mod.crow.long()
            bad = int(crow[0]) != 0 or int(crow[-1]) != mod.nnz or bool((crow[1:] < crow[:-1]).any())
        if bad:
            raise KroncFileError(f"{path / WEIGHTS}: the sparse index {name} is corrupted (positions outside its {r}x{c} grid "
                                 f"or not {mod.nnz} of them)")
