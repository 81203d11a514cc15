"""Small randomly initialised models for tests, docs and the demo (no downloads).

Hugging Face builders need ``transformers``; the LSTM language model and the MLP need only torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class LSTMLanguageModel(nn.Module):
    """Embedding -> multi-layer LSTM -> linear decoder (a word- or character-level LM)."""

    def __init__(self, vocab: int = 64, embed: int = 32, hidden: int = 64, layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True, dropout=dropout)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, input_ids: Tensor) -> Tensor:
        hidden, _ = self.lstm(self.embedding(input_ids))
        return self.decoder(hidden)


class FunctionalMLP(nn.Module):
    """A two-layer MLP whose second layer is an ``F.linear`` on a bare parameter (a functional site)."""

    def __init__(self, dim: int = 32, hidden: int = 64, out: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.w2 = nn.Parameter(torch.randn(out, hidden) / hidden**0.5)
        self.b2 = nn.Parameter(torch.zeros(out))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(torch.relu(self.fc1(x)), self.w2, self.b2)


def tiny_gpt2(layers: int = 2, width: int = 64, vocab: int = 128) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=vocab, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(layers: int = 2, width: int = 64, vocab: int = 128) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(layers: int = 2, width: int = 64, vocab: int = 128) -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                     vocab_size=vocab, max_position_embeddings=64)
    return BertModel(cfg).eval()


TOY_MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "bert": tiny_bert,
    "lstm": lambda: LSTMLanguageModel().eval(),
    "mlp": lambda: FunctionalMLP().eval(),
}
"""Builders by name; every model takes ``input_ids`` of shape (batch, seq) but ``mlp`` (batch, 32)."""


def toy_inputs(name: str, batch: int = 2, seq: int = 8, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(batch, 32, generator=g)
    return torch.randint(0, 64, (batch, seq), generator=g)


@torch.no_grad()
def with_decaying_spectra(model: nn.Module, power: float = 1.5, seed: int = 0) -> nn.Module:
    """Give every weight matrix a power-law spectrum ``s_i ∝ i^-power`` (as trained weights have), in place.

    Random initialisation has flat spectra, which no factorization compresses well; trained
    models do not. Norms are kept. Returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() != 2 or "embed" in name or "wte" in name or "wpe" in name:
            continue
        m, n = p.shape
        k = min(m, n)
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        s = torch.arange(1, k + 1, dtype=torch.float64) ** -power
        w = (u * s) @ v.T
        p.copy_((w * (p.double().norm() / w.norm())).to(p.dtype))
    return model
