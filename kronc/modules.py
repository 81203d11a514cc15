"""Compressed drop-in modules: what a compressed site looks like inside a model.

Each wraps a `Factorized` weight. Tied weights share one `Factorized` object between a
`CompressedEmbedding` and a `CompressedLinear`, so they stay tied (one set of parameters).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from .formats import Dense, Factorized
from .formats.training import training_weight


class CompressedLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` stored in a compressed format."""

    def __init__(self, weight: Factorized, bias: Tensor | None = None) -> None:
        super().__init__()
        self.weight_format = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        if self.bias is not None and self.bias.shape != (weight.shape[0],):
            raise ValueError(f"bias of shape {tuple(self.bias.shape)} does not match {weight.shape[0]} outputs")

    @property
    def in_features(self) -> int:
        return self.weight_format.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_format.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        fmt = self.weight_format
        w = training_weight(fmt, x)  # in training, a transient dense weight where it costs less
        if w is not None:
            return nn.functional.linear(x, w, self.bias)
        # every format takes the bias into its op, so the add is fused with the product
        return fmt(x) if self.bias is None else fmt(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class CompressedEmbedding(nn.Module):
    """An embedding table stored in a compressed format; a lookup builds only the rows it needs."""

    def __init__(self, weight: Factorized, padding_idx: int | None = None) -> None:
        super().__init__()
        self.weight_format = weight
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.weight_format.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight_format.shape[1]

    def forward(self, index: Tensor) -> Tensor:
        return self.weight_format.rows(index)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class CompressedLSTM(nn.Module):
    """A unidirectional multi-layer LSTM whose weight matrices may be compressed.

    Same inputs, outputs, gate order (i, f, g, o) and parameters as ``nn.LSTM``; the input
    projection of a whole sequence is one (compressed) matmul, the recurrent one runs per step.
    """

    def __init__(self, lstm: nn.LSTM, weights: dict[str, Factorized]) -> None:
        super().__init__()
        if lstm.bidirectional or lstm.proj_size:
            raise ValueError("kronc compresses unidirectional LSTMs without projections only")
        unknown = set(weights) - {f"weight_{k}_l{i}" for i in range(lstm.num_layers) for k in ("ih", "hh")}
        if unknown:
            raise ValueError(f"unknown LSTM weights {sorted(unknown)}")
        self.input_size, self.hidden_size, self.num_layers = lstm.input_size, lstm.hidden_size, lstm.num_layers
        self.batch_first, self.dropout = lstm.batch_first, float(lstm.dropout)
        self.ih = nn.ModuleList()
        self.hh = nn.ModuleList()
        self.bias_ih = nn.ParameterList()
        self.bias_hh = nn.ParameterList()
        for layer in range(self.num_layers):
            for kind, store in (("ih", self.ih), ("hh", self.hh)):
                name = f"weight_{kind}_l{layer}"
                store.append(weights.get(name) or Dense(getattr(lstm, name).detach()))
            if lstm.bias:
                self.bias_ih.append(nn.Parameter(getattr(lstm, f"bias_ih_l{layer}").detach().clone()))
                self.bias_hh.append(nn.Parameter(getattr(lstm, f"bias_hh_l{layer}").detach().clone()))

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if not isinstance(x, Tensor):
            raise TypeError("CompressedLSTM takes a padded tensor; packed sequences are not supported")
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1 if not self.batch_first else 0)
            hx = None if hx is None else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        seq = x.transpose(0, 1) if self.batch_first else x  # (T, B, in)
        batch = seq.shape[1]
        if hx is None:
            zeros = seq.new_zeros(self.num_layers, batch, self.hidden_size)
            hx = (zeros, zeros)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            w_ih = training_weight(cast(Factorized, self.ih[layer]), seq)
            gates_x = self.ih[layer](seq) if w_ih is None else nn.functional.linear(seq, w_ih)
            if len(self.bias_ih):
                gates_x = gates_x + (self.bias_ih[layer] + self.bias_hh[layer])
            h, c = hx[0][layer], hx[1][layer]
            # in training, the recurrent weight built once for all time steps where that costs less
            w_hh = training_weight(cast(Factorized, self.hh[layer]), h, tokens=seq.shape[0] * batch)
            outs = []
            for t in range(seq.shape[0]):
                gates = gates_x[t] + (self.hh[layer](h) if w_hh is None else nn.functional.linear(h, w_hh))
                i, f, g, o = gates.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
            seq = torch.stack(outs)
            if self.dropout and self.training and layer < self.num_layers - 1:
                seq = nn.functional.dropout(seq, self.dropout, training=True)
            h_n.append(h)
            c_n.append(c)
        out = seq.transpose(0, 1) if self.batch_first else seq
        state = (torch.stack(h_n), torch.stack(c_n))
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
            state = (state[0].squeeze(1), state[1].squeeze(1))
        return out, state

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, batch_first={self.batch_first}"
