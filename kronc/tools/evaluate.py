"""Quality measures for dense and compressed models: perplexity, bits per character, embeddings.

* `perplexity`: causal LMs (any Hugging Face causal LM, or a callable ids -> logits) over
  non-overlapping windows of a token stream.
* `bits_per_char`: a fixed-context character model such as `kronc.tools.models.TextGenRNN`.
* `embed`, `similarity_pearson`, `probe_accuracy`: sentence encoders such as all-MiniLM-L6-v2
  (mean-pooled, L2-normalised embeddings).

Every measure runs under ``torch.inference_mode`` with the model in eval mode (its training flag
is restored afterwards). Reported numbers should name the text, the token count and the window.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tokens import token_ids

__all__ = [
    "PerplexityResult",
    "bits_per_char",
    "char_windows",
    "embed",
    "encode_chars",
    "logistic_regression_cv",
    "perplexity",
    "probe_accuracy",
    "similarity_pearson",
]


# --------------------------------------------------------------------------- helpers


class _EvalMode:
    """Context manager: eval mode (if the model is an nn.Module) plus inference mode."""

    def __init__(self, model: Any) -> None:
        self.model = model if isinstance(model, nn.Module) else None
        self.was_training = False
        self.inference = torch.inference_mode()

    def __enter__(self) -> None:
        if self.model is not None:
            self.was_training = self.model.training
            self.model.eval()
        self.inference.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.inference.__exit__(*exc)
        if self.model is not None and self.was_training:
            self.model.train()


def _takes_kwarg(fn: Callable[..., Any], name: str) -> bool:
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _logits(out: Any) -> Tensor:
    """Logits from an HF ModelOutput, a dict, a tuple (first element) or a plain tensor."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


def _progress(iterable: Iterable[Any], total: int, desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def _device(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(mean NLL)`` over ``tokens`` predicted tokens in ``windows`` windows of ``window``.

    Each window predicts its tokens 2..window from the ones before, so
    ``tokens == windows * (window - 1)``.
    """

    ppl: float
    tokens: int
    windows: int
    window: int

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per predicted token, in nats."""
        return math.log(self.ppl)

    def __str__(self) -> str:
        return f"ppl {self.ppl:.3f} ({self.tokens} tokens, {self.windows} windows of {self.window})"


def perplexity(
    model: Callable[..., Any],
    tokenizer_or_ids: Any,
    text: str | None = None,
    window: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``text`` over non-overlapping windows of ``window`` tokens.

    ``tokenizer_or_ids`` is a tokenizer (its ``encode(text, add_special_tokens=False)`` is used,
    so no BOS is added) or the token ids themselves (then ``text`` is ignored). The stream is cut
    into ``len(ids) // window`` full windows (the tail is dropped), optionally only the first
    ``max_windows``; each window is scored independently. ``model`` is a Hugging Face causal LM
    (called as ``model(ids, use_cache=False)``, ``.logits`` read) or any callable mapping a
    ``(batch, window)`` int64 tensor to ``(batch, window, vocab)`` logits.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    ids = token_ids(tokenizer_or_ids, text)
    n_windows = ids.numel() // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    windows = ids[: n_windows * window].reshape(n_windows, window)

    kwargs = {"use_cache": False} if _takes_kwarg(model, "use_cache") else {}
    device = _device(model)
    total_nll = 0.0
    starts = range(0, n_windows, batch_size)
    with _EvalMode(model):
        for start in _progress(starts, len(starts), "perplexity", progress):
            batch = windows[start : start + batch_size].to(device)
            logits = _logits(model(batch, **kwargs))
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total_nll += float(nll)
    tokens = n_windows * (window - 1)
    return PerplexityResult(ppl=math.exp(total_nll / tokens), tokens=tokens, windows=n_windows, window=window)


# --------------------------------------------------------------------------- bits per character


def encode_chars(
    vocab: Mapping[str, int], text: str, meta_token: str | None = "<s>"
) -> tuple[Tensor, Tensor]:
    """Encode ``text`` the way textgenrnn was trained: one document per non-empty line.

    Each line becomes ``[meta_token] + chars`` (the meta token only if it is in ``vocab``);
    characters not in ``vocab`` (including the newlines) are dropped, as textgenrnn's tokenizer
    does. Returns ``(ids, scored)``: the concatenated id stream and a bool mask of the positions
    whose character is scored (every in-vocabulary character; not the meta tokens).
    """
    meta = vocab.get(meta_token) if meta_token is not None else None
    ids: list[int] = []
    scored: list[bool] = []
    for line in text.split("\n"):
        chars = [vocab[c] for c in line if c in vocab]
        if not chars:
            continue
        if meta is not None:
            ids.append(meta)
            scored.append(False)
        ids.extend(chars)
        scored.extend([True] * len(chars))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(scored, dtype=torch.bool)


def char_windows(ids: Tensor, context: int, pad_id: int = 0) -> Tensor:
    """``(len(ids), context)`` windows: row ``j`` holds the ``context`` ids before ``ids[j]``,
    left-padded with ``pad_id`` (documents are not separated: a meta token marks their starts)."""
    padded = torch.cat([torch.full((context,), pad_id, dtype=ids.dtype), ids])
    return padded.unfold(0, context, 1)[: ids.numel()]


def bits_per_char(
    model: Callable[[Tensor], Tensor],
    vocab: Mapping[str, int],
    text: str,
    context: int = 40,
    max_chars: int | None = None,
    batch_size: int = 512,
    progress: bool = False,
) -> float:
    """Mean ``-log2 p(char | previous context chars)`` of a char model over ``text``.

    The text is encoded with `encode_chars` (one document per line, each started by the
    ``"<s>"`` meta token when the vocabulary has it, out-of-vocabulary characters dropped) and
    every in-vocabulary character is scored from the ``context`` ids before it (left-padded with
    id 0). ``max_chars`` scores only the first that many scored characters. ``model`` maps a
    ``(batch, context)`` int64 tensor to ``(batch, vocab)`` logits.
    """
    ids, scored = encode_chars(vocab, text)
    positions = torch.nonzero(scored).squeeze(1)
    if max_chars is not None:
        positions = positions[:max_chars]
    if positions.numel() == 0:
        raise ValueError("no in-vocabulary characters to score")
    inputs = char_windows(ids, context)[positions]
    targets = ids[positions]

    device = _device(model)
    total = 0.0
    starts = range(0, positions.numel(), batch_size)
    with _EvalMode(model):
        for start in _progress(starts, len(starts), "bits/char", progress):
            x = inputs[start : start + batch_size].to(device)
            logits = _logits(model(x)).float()
            total += float(
                F.cross_entropy(logits, targets[start : start + batch_size].to(device), reduction="sum")
            )
    return total / positions.numel() / math.log(2)


# --------------------------------------------------------------------------- sentence embeddings


def embed(
    model: Callable[..., Any],
    tokenizer: Callable[..., Any],
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 16,
    normalize: bool = True,
) -> Tensor:
    """Mean-pooled (over the attention mask), optionally L2-normalised embeddings, ``(n, dim)``.

    ``max_length`` 256 is all-MiniLM-L6-v2's sentence-transformers setting. ``model`` is called
    with the tokenizer's output as keyword arguments and its ``last_hidden_state`` (or first
    output) is pooled.
    """
    device = _device(model)
    out: list[Tensor] = []
    with _EvalMode(model):
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            result = model(**enc)
            hidden = getattr(result, "last_hidden_state", None)
            if hidden is None:
                hidden = _logits(result)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(pooled.float().cpu())
    emb = torch.cat(out)
    return F.normalize(emb, dim=-1) if normalize else emb


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / math.sqrt(float((a * a).sum() * (b * b).sum())))


def similarity_pearson(
    model: Callable[..., Any],
    tokenizer: Callable[..., Any],
    docs: Sequence[str],
    human: np.ndarray,
    max_length: int = 256,
) -> float:
    """Pearson correlation between embedding cosine similarities and ``human`` ratings.

    Taken over the upper triangle (``i < j``) of the ``(n, n)`` matrices (e.g. `kronc.tools.data.lee_documents`).
    """
    human = np.asarray(human, dtype=np.float64)
    n = len(docs)
    if human.shape != (n, n):
        raise ValueError(f"human ratings have shape {human.shape}, expected ({n}, {n})")
    emb = embed(model, tokenizer, docs, max_length=max_length)
    sims = (emb @ emb.T).double().numpy()
    iu = np.triu_indices(n, 1)
    return _pearson(sims[iu], human[iu])


def logistic_regression_cv(
    features: Tensor | np.ndarray,
    labels: Sequence[int] | np.ndarray | Tensor,
    folds: int = 5,
    c: float = 1.0,
    seed: int = 0,
    max_iter: int = 200,
) -> float:
    """Mean held-out accuracy of L2-regularised multinomial logistic regression, ``folds``-fold CV.

    Folds are stratified by label after a seeded shuffle. Each fold fits ``sum CE + ||W||^2/(2c)``
    (sklearn's ``C=c``; bias not penalised) with L-BFGS on features standardised with the
    training fold's mean and standard deviation.
    """
    x_all = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = x_all.shape[0]
    if y_all.shape != (n,):
        raise ValueError(f"{n} feature rows but labels of shape {tuple(y_all.shape)}")
    if folds < 2 or folds > n:
        raise ValueError(f"folds must be in 2..{n}, got {folds}")
    classes, y_all = torch.unique(y_all, return_inverse=True)
    k = classes.numel()

    rng = np.random.default_rng(seed)
    fold_of = np.empty(n, dtype=np.int64)
    for cls in range(k):
        members = np.flatnonzero(y_all.numpy() == cls)
        rng.shuffle(members)
        fold_of[members] = (np.arange(members.size) + rng.integers(folds)) % folds

    accuracies: list[float] = []
    for fold in range(folds):
        test = torch.from_numpy(fold_of == fold)
        if not bool(test.any()):
            continue
        x_tr, y_tr, x_te, y_te = x_all[~test], y_all[~test], x_all[test], y_all[test]
        mean, std = x_tr.mean(0), x_tr.std(0).clamp(min=1e-12)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
        w = torch.zeros(x_tr.shape[1], k, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure(
            w: Tensor = w, b: Tensor = b, x: Tensor = x_tr, y: Tensor = y_tr, opt: Any = opt
        ) -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y, reduction="sum") + (w * w).sum() / (2 * c)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            pred = (x_te @ w + b).argmax(1)
        accuracies.append(float((pred == y_te).double().mean()))
    return float(np.mean(accuracies))


def probe_accuracy(
    model: Callable[..., Any],
    tokenizer: Callable[..., Any],
    sentences: Sequence[str],
    labels: Sequence[int],
    folds: int = 5,
    max_length: int = 256,
    seed: int = 0,
    c: float = 1.0,
) -> float:
    """Cross-validated accuracy of a logistic-regression probe on the model's sentence embeddings.

    Embeddings as in `embed`; the probe is `logistic_regression_cv` (no sklearn needed) with
    inverse regularisation strength ``c``, folds stratified after a shuffle seeded by ``seed``.
    """
    emb = embed(model, tokenizer, sentences, max_length=max_length)
    return logistic_regression_cv(emb, labels, folds=folds, c=c, seed=seed)
