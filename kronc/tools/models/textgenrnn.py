"""textgenrnn's pretrained character-level LSTM language model, in plain PyTorch.

The architecture is Max Woolf's textgenrnn (``pip install textgenrnn``): a character embedding,
two stacked LSTMs, attention-weighted average pooling over the concatenation of the embedding and
both LSTM outputs, and a dense layer giving the logits of the next character. The module is
``torch.fx.symbolic_trace``-able: both LSTMs are ``nn.LSTM`` submodules (leaves to fx) and the
forward has no data-dependent Python control flow.

`TextGenRNN.from_keras_hdf5` ports the Keras weights file shipped in the package. Those weights
were saved from a cuDNN LSTM, whose gate order (i, f, c, o) matches PyTorch's (i, f, g, o) but
whose input kernel blocks hold cuDNN's raw ``(H, in)`` buffers: each gate block is reshaped rather
than transposed, the recurrent kernel blocks are used as stored, and the 8H bias splits into the
input-hidden half and the hidden-hidden half.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

#: Characters of context the pretrained model was trained with.
CONTEXT = 40


class TextGenRNN(nn.Module):
    """Char LSTM: ``(batch, context)`` int64 ids -> ``(batch, vocab_size)`` next-char logits.

    Id 0 is the left padding (and the id of unknown characters); ids 1.. are the vocabulary.
    """

    def __init__(self, vocab_size: int = 465, embed_dim: int = 100, hidden: int = 128) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.hidden = hidden
        features = embed_dim + 2 * hidden
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.rnn_1 = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.rnn_2 = nn.LSTM(hidden, hidden, batch_first=True)
        # Attention-weighted average: one score weight per feature, no bias.
        self.attention = nn.Linear(features, 1, bias=False)
        self.output = nn.Linear(features, vocab_size)

    def forward(self, ids: Tensor) -> Tensor:
        emb = self.embedding(ids)
        h1 = self.rnn_1(emb)[0]
        h2 = self.rnn_2(h1)[0]
        seq = torch.cat([emb, h1, h2], dim=-1)  # (batch, time, features)
        scores = self.attention(seq).squeeze(-1)  # (batch, time)
        weights = torch.softmax(scores, dim=-1)
        pooled = (seq * weights.unsqueeze(-1)).sum(dim=1)  # (batch, features)
        return self.output(pooled)

    @classmethod
    def from_keras_hdf5(cls, path: str | Path) -> TextGenRNN:
        """Build the model from textgenrnn's Keras weights file (needs ``h5py``)."""
        import h5py  # type: ignore[import-untyped]  # h5py ships no type information

        with h5py.File(path, "r") as f:

            def get(layer: str, name: str) -> Tensor:
                return torch.from_numpy(f[f"{layer}/{layer}/{name}:0"][()].copy()).float()

            emb = get("embedding", "embeddings")
            rnn = {
                layer: (get(layer, "kernel"), get(layer, "recurrent_kernel"), get(layer, "bias"))
                for layer in ("rnn_1", "rnn_2")
            }
            att = get("attention", "attention_W")
            out_w, out_b = get("output", "kernel"), get("output", "bias")

        vocab_size, embed_dim = emb.shape
        hidden = rnn["rnn_1"][1].shape[0]
        model = cls(vocab_size=vocab_size, embed_dim=embed_dim, hidden=hidden)
        with torch.no_grad():
            model.embedding.weight.copy_(emb)
            for layer in ("rnn_1", "rnn_2"):
                lstm: nn.LSTM = getattr(model, layer)
                for name, value in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"),
                                       cudnn_lstm_to_torch(*rnn[layer]), strict=True):
                    lstm.get_parameter(name).copy_(value)
            model.attention.weight.copy_(att.T)
            model.output.weight.copy_(out_w.T)
            model.output.bias.copy_(out_b)
        return model.eval()


def cudnn_lstm_to_torch(
    kernel: Tensor, recurrent_kernel: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keras-saved cuDNN LSTM weights -> ``(weight_ih, weight_hh, bias_ih, bias_hh)`` for nn.LSTM.

    ``kernel`` is ``(in, 4H)``, ``recurrent_kernel`` ``(H, 4H)`` and ``bias`` ``(8H,)``, gates in
    the order i, f, c, o (PyTorch's i, f, g, o).
    """
    hidden = recurrent_kernel.shape[0]
    w_ih = torch.cat(
        [kernel[:, g * hidden : (g + 1) * hidden].contiguous().reshape(hidden, -1) for g in range(4)]
    )
    w_hh = torch.cat([recurrent_kernel[:, g * hidden : (g + 1) * hidden] for g in range(4)])
    return w_ih, w_hh, bias[: 4 * hidden].clone(), bias[4 * hidden :].clone()
