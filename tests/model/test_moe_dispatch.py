"""``dispatch`` and ``combine``, the pure functions at the router/expert seam, on indices worked out by hand."""

from __future__ import annotations

import torch

from stagemesh.model.moe import combine, dispatch

# 3 tokens, top-2 of 4 experts (expert 3 gets nothing):
#   token 0 -> experts (2, 0) with weights (0.6, 0.4)
#   token 1 -> experts (0, 1) with weights (0.7, 0.3)
#   token 2 -> experts (2, 1) with weights (0.9, 0.1)
# Flattened row-major, row r is token r // 2:   flat = [2, 0, 0, 1, 2, 1]
# A stable sort by expert keeps token order inside each expert:
#   expert 0: flat rows 1, 2   expert 1: flat rows 3, 5   expert 2: flat rows 0, 4
#   order       = [1, 2, 3, 5, 0, 4]
#   token_index = order // 2 = [0, 1, 1, 2, 0, 2]
#   counts      = [2, 2, 2, 0]
#   weights     = flat weights [0.6, 0.4, 0.7, 0.3, 0.9, 0.1] taken in that order = [0.4, 0.7, 0.3, 0.1, 0.6, 0.9]
IDS = torch.tensor([[2, 0], [0, 1], [2, 1]])
WEIGHTS = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
X = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])  # token t is [t + 1, 10 (t + 1)]


def test_dispatch_groups_rows_by_expert_keeping_token_order_inside_each():
    d = dispatch(X, IDS, WEIGHTS, num_experts=4)
    assert d.token_index.tolist() == [0, 1, 1, 2, 0, 2]
    assert d.counts.tolist() == [2, 2, 2, 0]
    assert torch.allclose(d.weights, torch.tensor([0.4, 0.7, 0.3, 0.1, 0.6, 0.9]))
    assert d.x.tolist() == [[1, 10], [2, 20], [2, 20], [3, 30], [1, 10], [3, 30]]


def test_combine_sums_each_rows_weighted_output_back_into_its_token():
    d = dispatch(X, IDS, WEIGHTS, num_experts=4)
    # Expert "output" of grouped row r is (r + 1) in both columns:
    #   token 0 <- rows 0 (w 0.4) and 4 (w 0.6): 0.4 * 1 + 0.6 * 5 = 3.4
    #   token 1 <- rows 1 (w 0.7) and 2 (w 0.3): 0.7 * 2 + 0.3 * 3 = 2.3
    #   token 2 <- rows 3 (w 0.1) and 5 (w 0.9): 0.1 * 4 + 0.9 * 6 = 5.8
    outputs = torch.arange(1.0, 7.0).unsqueeze(1).repeat(1, 2)  # [6, 2]
    out = combine(outputs, d.weights, d.token_index, num_tokens=3)
    assert torch.allclose(out, torch.tensor([[3.4, 3.4], [2.3, 2.3], [5.8, 5.8]]))


def test_dispatch_then_identity_experts_then_combine_gives_back_the_weighted_tokens():
    d = dispatch(X, IDS, WEIGHTS, num_experts=4)
    out = combine(d.x, d.weights, d.token_index, num_tokens=3)
    assert torch.allclose(out, X * WEIGHTS.sum(dim=1, keepdim=True))
