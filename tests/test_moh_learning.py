"""A tiny model with MoH attention learns a toy task (torch backend, seconds on CPU)."""

from __future__ import annotations

import torch
from torch import nn

from seqpar.nn import MoHAttention

VOCAB, SEQ, WIDTH = 16, 16, 32


class TinyMoHModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(SEQ, WIDTH)
        self.attn = MoHAttention(WIDTH, 4, num_kv_heads=2, num_shared_heads=1, top_k=2, backend="torch")
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        a, aux = self.attn(x)
        return self.head(self.norm(x + a)), aux


def test_previous_token_copy_is_learned():
    """Predict the previous token: impossible without attending to the right key (loss ~ ln 16)."""
    torch.manual_seed(0)
    model = TinyMoHModel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        ids = torch.randint(0, VOCAB, (16, SEQ))
        logits, aux = model(ids)
        loss = nn.functional.cross_entropy(logits[:, 1:].reshape(-1, VOCAB), ids[:, :-1].reshape(-1))
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert start > 2.5, f"the task should start near ln(16) = 2.77, got {start:.2f}"
    assert end < 0.2 * start, f"loss did not fall clearly: {start:.2f} -> {end:.2f} ({[round(x, 2) for x in losses]})"
    # routing stayed sparse while learning: 3 of 4 heads per token
    assert torch.all((model.attn.last_routing.gates > 0).sum(-1) == 3)
