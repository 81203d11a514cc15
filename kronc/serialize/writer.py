"""`save`: write a compressed model to a folder, atomically (written beside it, then renamed into place).

The layout is in `kronc.serialize` (package docstring) and `files`; the manifest is written last, so a
folder with a manifest is a finished save.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import fx, nn

from ..plan import Plan
from ..state_dicts import dedupe, unshared
from .examples import save_examples
from .files import (
    EXAMPLES,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    check_target,
    replace_dir,
    sha256,
    temp_name,
    version,
)


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
    check_target(path, overwrite)
    # Everything is written to a sibling folder and renamed into place, so an interruption (kill,
    # Ctrl-C, a full disk) leaves the earlier contents of `path` whole, and no stale file survives.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temp_name(path)
    tmp.mkdir()
    try:
        _write_save(model, plan, tmp, tokenizer=tokenizer, source=source, example_inputs=example_inputs)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path




def _write_save(model: nn.Module, plan: Plan, path: Path, *, tokenizer: Any, source: str | None,
                example_inputs: Any) -> None:
    """Write every file of a save into the (new, empty) folder ``path``; the manifest last."""
    from safetensors.torch import save_file

    is_graph = isinstance(model, fx.GraphModule)
    config = getattr(model, "config", None)
    is_hf = config is not None and hasattr(config, "to_json_file") and not is_graph
    if is_hf and config is not None:
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
    example_spec = save_examples(examples, path / EXAMPLES) if is_graph and examples is not None else None

    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
    manifest = {
        "format_version": FORMAT_VERSION,
        "versions": {name: version(name) for name in ("kronc", "torch", "transformers", "safetensors")},
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "huggingface": is_hf,
        "output": "graph" if is_graph else "module",
        "source": source,
        "dtype": dtypes[0] if len(dtypes) == 1 else None,
        "weights": {"file": WEIGHTS, "bytes": (path / WEIGHTS).stat().st_size, "sha256": sha256(path / WEIGHTS),
                    "tensors": len(state)},
        "example_inputs": example_spec,
        "plan": plan.model_dump(mode="json"),
        "policy": getattr(model, "kronc_policy", None),
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
