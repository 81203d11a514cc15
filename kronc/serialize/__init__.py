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

Modules: `files` (the layout's names, the error, file helpers), `writer` (`save`), `reader` (`load`
and the checks of a saved folder), `rebuild` (the architecture with empty formats swapped in) and
`examples` (stored example inputs for re-capturing graphs).
"""

from __future__ import annotations

from ..state_dicts import stored_bytes
from .files import EXAMPLES, FORMAT_VERSION, MANIFEST, WEIGHTS, KroncFileError, ModelArg
from .reader import load, read_manifest, read_weights
from .rebuild import empty_format
from .writer import save

__all__ = [
    "EXAMPLES", "FORMAT_VERSION", "MANIFEST", "WEIGHTS", "KroncFileError", "ModelArg", "empty_format", "load",
    "read_manifest", "read_weights", "save", "stored_bytes",
]
