"""Perplexity (or bits per character), stored bytes and latency of one model: `kronc eval` and `kronc demo`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...tokens import token_ids
from ..evaluate import bits_per_char, perplexity
from ..report import Measurement, measure_latency, measure_latency_pair, stored_bytes
from ..resolve_model import sample_inputs
from .args import UsageError
from .inputs import eval_text


def measure(resolved: Any, text_file: Path | None, window: int, windows: int, latency_runs: int,
             *, progress: bool, text: tuple[str, str] | None = None, dense: Any = None) -> Any:
    """Perplexity (causal LMs), stored bytes and prefill latency of one model (timed alternately with
    ``dense``, the uncompressed model, when given)."""
    if window < 2 or windows < 1 or latency_runs < 1:
        raise UsageError("--window must be at least 2, --windows and --latency-runs at least 1")
    measured = Measurement(stored_bytes=stored_bytes(resolved.model))
    window = min(window, resolved.max_length or window)
    if resolved.task == "causal-lm" and resolved.tokenizer is not None:
        name, body = text if text is not None else eval_text(text_file)
        result = _perplexity(perplexity, resolved, body, name, window, windows, progress)
        measured.perplexity, measured.tokens = result.ppl, result.tokens
        measured.windows, measured.window, measured.text = result.windows, result.window, name
    elif resolved.task == "char-lm" and isinstance(resolved.tokenizer, dict):
        name, body = text if text is not None else eval_text(text_file)
        chars = windows * window
        measured.bits_per_char = bits_per_char(resolved.model, resolved.tokenizer, body, context=resolved.context or 40,
                                               max_chars=chars, progress=progress)
        measured.tokens, measured.text = min(chars, len(body)), name
    elif text_file is not None:
        print(f"note: {resolved.spec} is not a language model ({resolved.task}): no perplexity", file=sys.stderr)
    length = window if resolved.task != "char-lm" else 64
    inputs, kwargs = sample_inputs(resolved, length)
    model = resolved.model
    if dense is None:
        measured.latency_s = measure_latency(lambda: model(*inputs, **kwargs), repeats=latency_runs)
    else:
        measured.dense_latency_s, measured.latency_s = measure_latency_pair(
            lambda: dense(*inputs, **kwargs), lambda: model(*inputs, **kwargs), repeats=latency_runs)
    measured.latency_tokens = length
    return measured


def _perplexity(fn: Callable[..., Any], resolved: Any, body: str, name: str, window: int, windows: int,
                progress: bool) -> Any:
    ids = token_ids(resolved.tokenizer, body)
    if ids.numel() < window:
        if ids.numel() < 16:
            raise UsageError(f"{name} has {ids.numel()} tokens: too short to measure perplexity")
        window = int(ids.numel())
    return fn(resolved.model, ids, window=window, max_windows=windows, progress=progress)
