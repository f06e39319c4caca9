"""Bits per byte: exact on a hand-made case; specials and ignored targets excluded; unigram baseline."""

import math

import torch

from nanochat.loss_eval import UnigramBaseline, evaluate_bpb


class UniformModel(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x, y, loss_reduction="mean"):
        logits = torch.zeros(*x.shape, self.vocab)
        return torch.nn.functional.cross_entropy(logits.view(-1, self.vocab), y.view(-1), ignore_index=-1,
                                                 reduction=loss_reduction).view(y.shape)


def test_uniform_model_bpb():
    vocab = 8
    token_bytes = torch.tensor([0, 1, 1, 2, 2, 3, 1, 1], dtype=torch.int32)
    y = torch.tensor([[1, 2, 3, 0, -1, 5]])
    x = torch.zeros_like(y)
    bpb = evaluate_bpb(UniformModel(vocab), [(x, y)], token_bytes)
    counted_tokens, counted_bytes = 4, 1 + 1 + 2 + 3
    assert math.isclose(bpb, counted_tokens * math.log(vocab) / (math.log(2) * counted_bytes), rel_tol=1e-6)


def test_unigram_baseline_matches_hand_computation():
    token_bytes = torch.tensor([0, 1, 2], dtype=torch.int32)
    counts = torch.tensor([0, 3, 1])
    baseline = UnigramBaseline(counts, token_bytes)
    y = torch.tensor([[1, 2, 0, -1]])
    batches = list(baseline.observing([(torch.zeros_like(y), y)]))
    assert len(batches) == 1
    p = torch.tensor([1, 4, 2], dtype=torch.float64) / 7
    expected = -(math.log(p[1]) + math.log(p[2])) / (math.log(2) * 3)
    assert math.isclose(baseline.bpb(), expected, rel_tol=1e-9)
