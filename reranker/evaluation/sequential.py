"""`sasrec`: a self-attentive sequential retriever (Kang & McAuley 2018), the kind of strong,
order-aware upstream that real deployments run and that a fixed text blend hurts most.

A causal transformer over the last `max_len` items of a history (learned item and position
embeddings, pre-norm blocks) predicts the next item at every position; the item embeddings are
shared between input and output (score = hidden state . item embedding). Trained in torch on the
CPU with a softmax cross-entropy over the next item (gSASRec, Petrov & Macdonald 2023, shows this
beats the original one-negative BCE): over the full catalog when it has at most `negatives` items,
else over `negatives` uniformly sampled items shared by the batch, with the logQ correction (the
sampled logits count n / negatives times) and the target's accidental hits masked.

Every history is cut into windows of `max_len` from its end, so every event is a training target
once per epoch. Seeded (torch.manual_seed), `threads` torch threads while fitting and scoring.
Histories only: the targets a caller holds out are never seen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from reranker.evaluation.matrixretriever import _MatrixRetriever


class SASRec(_MatrixRetriever):
    name = "sasrec"

    def __init__(
        self,
        dim: int = 64,
        max_len: int = 50,
        blocks: int = 2,
        heads: int = 2,
        dropout: float = 0.2,
        epochs: int = 30,
        batch: int = 128,
        lr: float = 2e-3,
        negatives: int = 4096,
        seed: int = 0,
        threads: int = 1,
    ) -> None:
        self.dim, self.max_len, self.blocks, self.heads, self.dropout = dim, max_len, blocks, heads, dropout
        self.epochs, self.batch, self.lr, self.negatives = epochs, batch, lr, negatives
        self.seed, self.threads = seed, threads
        self.losses: list[float] = []  # mean training loss per epoch

    def fit(self, histories: Mapping[str, Sequence[str]], catalog: Sequence[str]) -> SASRec:
        self._histories = histories
        super().fit(histories, catalog)
        del self._histories
        return self

    def _windows(self) -> np.ndarray:
        """(windows, max_len + 1) item indices + 1 (0 = padding), left-padded: inputs [:, :-1], targets [:, 1:]."""
        width = self.max_len + 1
        out = []
        for history in self._histories.values():
            seq = [self.item_index[i] + 1 for i in history]
            for end in range(len(seq), 1, -self.max_len):
                window = seq[max(0, end - width) : end]
                out.append([0] * (width - len(window)) + window)
        return np.array(out, dtype=np.int64).reshape(-1, width)

    def _fit(self) -> None:
        import torch

        self._sequences = {
            self.user_index[u]: [self.item_index[i] + 1 for i in h[-self.max_len :]] for u, h in self._histories.items()
        }
        windows = self._windows()
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            torch.manual_seed(self.seed)
            self.model = _build_model(len(self.items), self.dim, self.max_len, self.blocks, self.heads, self.dropout)
            if len(windows):
                self._train(torch.from_numpy(windows))
            self.model.eval()
        finally:
            torch.set_num_threads(previous)

    def _train(self, windows: object) -> None:
        import torch

        n = len(self.items)
        optim = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        sampled = n > self.negatives
        correction = math.log(n / self.negatives) if sampled else 0.0
        self.model.train()
        for _ in range(self.epochs):
            perm = torch.randperm(windows.shape[0])
            total, count = 0.0, 0
            for start in range(0, windows.shape[0], self.batch):
                chunk = windows[perm[start : start + self.batch]]
                inputs, targets = chunk[:, :-1], chunk[:, 1:]
                hidden = self.model(inputs)
                keep = targets > 0
                h, t = hidden[keep], targets[keep]
                table = self.model.items.weight
                if sampled:
                    neg = torch.randint(1, n + 1, (self.negatives,))
                    positive = (h * table[t]).sum(-1, keepdim=True)
                    negative = h @ table[neg].T + correction
                    negative = negative.masked_fill(neg[None, :] == t[:, None], -torch.inf)
                    logits = torch.cat([positive, negative], dim=1)
                    loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(t), dtype=torch.long))
                else:
                    loss = torch.nn.functional.cross_entropy(h @ table[1:].T, t - 1)
                optim.zero_grad()
                loss.backward()
                optim.step()
                total += loss.item() * len(t)
                count += len(t)
            self.losses.append(total / max(count, 1))

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        import torch

        batch = np.zeros((rows.size, self.max_len), dtype=np.int64)
        for r, row in enumerate(rows.tolist()):
            seq = self._sequences.get(row, [])
            if seq:
                batch[r, -len(seq) :] = seq
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                hidden = self.model(torch.from_numpy(batch))[:, -1]
                return (hidden @ self.model.items.weight[1:].T).numpy()
        finally:
            torch.set_num_threads(previous)


def _build_model(items: int, dim: int, max_len: int, blocks: int, heads: int, dropout: float) -> object:
    import torch
    from torch import nn

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.items = nn.Embedding(items + 1, dim, padding_idx=0)
            self.positions = nn.Embedding(max_len, dim)
            self.dropout = nn.Dropout(dropout)
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim * 2, dropout=dropout, batch_first=True,
                                           norm_first=True)
                for _ in range(blocks)
            )
            self.norm = nn.LayerNorm(dim)
            nn.init.normal_(self.items.weight, std=dim**-0.5)
            nn.init.normal_(self.positions.weight, std=0.02)
            self.register_buffer("causal", torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=1))

        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            length = seq.shape[1]
            pad = (seq > 0).unsqueeze(-1)
            x = self.items(seq) + self.positions.weight[-length:]
            x = self.dropout(x) * pad
            mask = self.causal[:length, :length]
            for layer in self.layers:
                x = layer(x, src_mask=mask, is_causal=True) * pad
            return self.norm(x)

    return Model()
