"""Turn what a user types as MODEL into a model, its tokenizer and what it can be measured on.

MODEL may be:

* a local Hugging Face folder (``config.json``; loaded with ``AutoModelForCausalLM`` when its
  architecture is a causal LM, else ``AutoModel``, in fp32, offline);
* a folder written by `kronc.save` (``kronc.json``; loaded with `kronc.load`, never recompressed);
* a built-in name from `kronc.tools.zoo.BUILTIN_MODELS` (``smollm2-135m``, ``minilm-l6``, ``textgenrnn``);
* ``toy:NAME``, a small random model from `kronc.tools.toy.TOY_MODELS` (seeded, so every call builds the
  same weights);
* ``package.module:factory``, a zero-argument callable returning an ``nn.Module`` (or a
  ``(model, tokenizer)`` pair), or an ``nn.Module`` attribute.

Unknown or unreadable MODEL raises `ModelSpecError` (a ``ValueError``) naming the accepted forms.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ModelSpecError
from ..factory import call_factory
from ..modules import CompressedEmbedding
from ..serialize import ModelArg, read_manifest
from ..serialize import load as load_compressed
from .toy import TOY_MODELS, toy_inputs
from .zoo import BUILTIN_MODELS, require

Task = Literal["causal-lm", "char-lm", "encoder", "other"]
Kind = Literal["huggingface", "saved", "builtin", "toy", "factory"]

TOY_PREFIX = "toy:"
TOY_SEED = 0


@dataclass
class ResolvedModel:
    """A model as loaded from a MODEL argument, with what is needed to feed and measure it."""

    model: nn.Module
    spec: str
    kind: Kind
    task: Task
    tokenizer: Any = None
    """``encode(text, add_special_tokens=False)`` for LMs; a char -> id dict for char LMs."""
    example_inputs: Any = None
    """Inputs to capture the model with (None: fx tracing or Hugging Face dummy inputs)."""
    max_length: int | None = None
    """Longest sequence the model takes (position embeddings), if bounded."""
    context: int | None = None
    """Fixed context of a char LM."""

    @property
    def is_huggingface(self) -> bool:
        return hasattr(self.model, "config") and hasattr(getattr(self.model, "config", None), "to_json_file")

    @property
    def saved(self) -> bool:
        return self.kind == "saved"


class ByteTokenizer:
    """Text to ids for models without a tokenizer (toy models): UTF-8 bytes modulo the vocabulary."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


def resolve(spec: str, *, architecture: str | None = None) -> ResolvedModel:
    """Load MODEL. ``architecture`` rebuilds a saved plain (non Hugging Face) model, as in `kronc.load`."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "kronc.json").is_file():
            return _saved(path, architecture)
        if (path / "config.json").is_file():
            return _huggingface_folder(path)
        raise ModelSpecError(
            f"{path} is neither a Hugging Face model folder (no config.json) nor a kronc save (no kronc.json)"
        )
    if spec.startswith(TOY_PREFIX):
        return _toy(spec)
    if spec in BUILTIN_MODELS:
        return _builtin(spec)
    if ":" in spec and not path.exists():
        model, tokenizer = _factory(spec)
        return _finish(model, spec, "factory", tokenizer)
    if path.exists():
        raise ModelSpecError(f"{path} is a file; MODEL must be a folder, a built-in name or package.module:factory")
    raise ModelSpecError(f"unknown model {spec!r}: no such folder, built-in name, toy:NAME or package.module:factory")


def accepted_forms() -> str:
    return (
        "use a Hugging Face folder, a kronc save folder, a built-in name "
        f"({', '.join(BUILTIN_MODELS)}), toy:NAME ({', '.join(TOY_MODELS)}) or package.module:factory"
    )


def build_architecture(spec: str) -> nn.Module:
    """The uncompressed architecture named by ``toy:NAME``, a built-in name or ``package.module:factory``
    (for `kronc.load`)."""
    if spec.startswith(TOY_PREFIX):
        return _toy_model(spec)
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]()[0]
    if ":" in spec:
        return _factory(spec)[0]
    raise ModelSpecError(f"cannot rebuild an architecture from {spec!r}: use toy:NAME or package.module:factory")


# --------------------------------------------------------------------------- the forms


def _toy_model(spec: str) -> nn.Module:
    name = spec[len(TOY_PREFIX):]
    if name not in TOY_MODELS:
        raise ModelSpecError(f"unknown toy model {name!r}; toy models: {', '.join(TOY_MODELS)}")
    state = torch.random.get_rng_state()
    torch.manual_seed(TOY_SEED)
    try:
        return TOY_MODELS[name]().eval()
    finally:
        torch.random.set_rng_state(state)


def _toy(spec: str) -> ResolvedModel:
    model = _toy_model(spec)
    resolved = _finish(model, spec, "toy", None)
    resolved.example_inputs = toy_inputs(spec[len(TOY_PREFIX):])
    return resolved


def _builtin(name: str) -> ResolvedModel:
    model, tokenizer = BUILTIN_MODELS[name]()
    if isinstance(tokenizer, Mapping):  # textgenrnn: a char vocabulary
        return _char_lm(model, name, "builtin", tokenizer)
    return _finish(model, name, "builtin", tokenizer)


def _huggingface_folder(path: Path) -> ResolvedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = require("transformers", "pip install 'transformers>=5.0'")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise ModelSpecError(f"{path}/config.json cannot be read: {_first_line(e)}") from e
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = auto.from_pretrained(str(path), dtype=torch.float32)
    except Exception as e:
        raise ModelSpecError(f"cannot load the Hugging Face model in {path}: {_first_line(e)}") from e
    return _finish(model.eval(), str(path), "huggingface", folder_tokenizer(path))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def folder_tokenizer(path: Path) -> Any:
    """The Hugging Face tokenizer saved in ``path``, or None when there is none (or it is empty)."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception:
        return None
    return tokenizer if len(tokenizer) > 1 else None


def _saved(path: Path, architecture: str | None) -> ResolvedModel:
    manifest = read_manifest(path)
    source = manifest.get("source")
    arch: str | nn.Module | None = architecture
    tokenizer: Any = None
    if arch is None and not manifest.get("huggingface") and source in BUILTIN_MODELS:
        arch, tokenizer = BUILTIN_MODELS[source]()  # e.g. textgenrnn: its architecture and vocabulary
    model = load(path, arch)
    if isinstance(tokenizer, Mapping):
        return _char_lm(model, str(path), "saved", tokenizer)
    resolved = _finish(model, str(path), "saved", folder_tokenizer(path))
    source = source or architecture
    if isinstance(source, str) and source.startswith(TOY_PREFIX):
        resolved.example_inputs = toy_inputs(source[len(TOY_PREFIX):])
    return resolved


def _char_lm(model: nn.Module, spec: str, kind: Kind, vocab: Mapping[str, int]) -> ResolvedModel:
    context = int(getattr(model, "context", 40))
    ids = torch.zeros(1, context, dtype=torch.long)
    return ResolvedModel(model.eval(), spec, kind, "char-lm", dict(vocab), (ids,), context=context)


def _factory(spec: str) -> tuple[nn.Module, Any]:
    return call_factory(spec)


# --------------------------------------------------------------------------- what a model is


def _finish(model: nn.Module, spec: str, kind: Kind, tokenizer: Any) -> ResolvedModel:
    model.eval()
    task = detect_task(model)
    if tokenizer is None and task == "causal-lm":
        vocab = vocab_size(model)
        tokenizer = ByteTokenizer(vocab) if vocab else None
    return ResolvedModel(model, spec, kind, task, tokenizer, max_length=max_length(model))


def vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if isinstance(getattr(config, "vocab_size", None), int):
        return int(config.vocab_size)  # type: ignore[union-attr]
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            return mod.num_embeddings
        if isinstance(mod, CompressedEmbedding):
            return mod.num_embeddings
    return None


def max_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def detect_task(model: nn.Module) -> Task:
    """``causal-lm`` when ids of shape (1, T) give logits (1, T, vocab); Hugging Face models by class."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        name = type(model).__name__
        if name.endswith(("ForCausalLM", "LMHeadModel")) and not getattr(config, "is_encoder_decoder", False):
            return "causal-lm"
        return "encoder" if name.endswith("Model") else "other"
    vocab = vocab_size(model)
    if not vocab:
        return "other"
    ids = torch.zeros(1, 4, dtype=torch.long)
    try:
        with torch.inference_mode():
            out = model(ids)
    except Exception:
        return "other"
    logits = getattr(out, "logits", out[0] if isinstance(out, tuple) else out)
    if isinstance(logits, Tensor) and logits.dim() == 3 and tuple(logits.shape[:2]) == (1, 4):
        return "causal-lm"
    return "other"


def sample_inputs(resolved: ResolvedModel, length: int, batch: int = 1, seed: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs of ``length`` tokens to time a forward pass (prefill) with."""
    g = torch.Generator().manual_seed(seed)
    if resolved.task == "char-lm" and resolved.context:
        chars = len(resolved.tokenizer) + 1 if isinstance(resolved.tokenizer, Mapping) else 64
        return (torch.randint(0, chars, (length, resolved.context), generator=g),), {}
    vocab = vocab_size(resolved.model)
    if vocab is None:
        if resolved.example_inputs is not None:
            ex = resolved.example_inputs
            return (ex if isinstance(ex, tuple) else (ex,)), {}
        raise ModelSpecError(f"cannot make inputs for {resolved.spec}: it has no embedding and no example inputs")
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    kwargs = {"use_cache": False} if resolved.is_huggingface and resolved.task == "causal-lm" else {}
    return (ids,), kwargs


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


__all__ = [
    "ByteTokenizer", "ModelSpecError", "ResolvedModel", "accepted_forms", "build_architecture", "detect_task",
    "max_length", "resolve", "sample_inputs", "vocab_size",
]


def load(path: str | Path, model: ModelArg = None, *, example_inputs: Any = None, verify: bool = True,
         device: str | torch.device | None = None) -> nn.Module:
    """`kronc.load`: `kronc.serialize.load` that also knows kronc's own model names.

    A model saved with ``source="toy:NAME"`` or a built-in name (`kronc.tools.zoo.BUILTIN_MODELS`) is
    rebuilt by itself, and ``model`` may be such a name; everything else is as in `kronc.serialize.load`.
    """
    if model is None or isinstance(model, str):
        name = model if model is not None else read_manifest(path).get("source") if not _is_hf(path) else None
        if isinstance(name, str) and (name.startswith(TOY_PREFIX) or name in BUILTIN_MODELS):
            model = build_architecture(name)
    return load_compressed(path, model, example_inputs=example_inputs, verify=verify, device=device)


def _is_hf(path: str | Path) -> bool:
    return bool(read_manifest(path).get("huggingface"))
