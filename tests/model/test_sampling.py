"""The batched sampler: greedy, temperature, top-k, top-p, and per-row seeded streams."""

from __future__ import annotations

import torch

from stagemesh.model.sampling import SamplingBatch, sample
from stagemesh.serving.params import SampleSpec


def _batch(n, temperature=1.0, seed=7, index=0, **row):
    """``n`` rows; a list gives each row its own value, anything else is every row's."""
    columns = dict(temperature=temperature, seed=seed, index=index, **row)
    as_list = {name: v if isinstance(v, list) else [v] * n for name, v in columns.items()}
    return SamplingBatch.of([SampleSpec(**dict(zip(as_list, values))) for values in zip(*as_list.values())], "cpu")


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    assert sample(logits, _batch(5, temperature=0.0)).tolist() == logits.argmax(-1).tolist()


def test_top_k_1_is_greedy_at_any_temperature():
    logits = torch.randn(4, 50)
    assert sample(logits, _batch(4, temperature=2.0, top_k=1)).tolist() == logits.argmax(-1).tolist()


def test_same_seed_and_index_give_the_same_token_in_any_batch():
    torch.manual_seed(0)
    row = torch.randn(1, 100)
    alone = sample(row, _batch(1, seed=1234, index=3))
    others = torch.randn(6, 100)
    batch = torch.cat([others[:3], row, others[3:]])
    mixed = sample(batch, _batch(7, seed=[1, 2, 3, 1234, 5, 6, 8], index=[0, 1, 2, 3, 4, 5, 6]))
    assert mixed[3] == alone[0]


def test_different_seeds_and_indices_draw_differently():
    logits = torch.zeros(1, 1000)  # uniform: every draw is the noise alone
    draws = {int(sample(logits, _batch(1, seed=s, index=i))[0]) for s in range(20) for i in range(5)}
    assert len(draws) > 80


def test_samples_follow_the_softmax_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    n = 6000
    batch = _batch(n, seed=list(range(n)))
    counts = torch.bincount(sample(logits.expand(n, 3), batch), minlength=3).float() / n
    torch.testing.assert_close(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    n = 2000
    seeds = list(range(n))
    top2 = sample(logits.expand(n, 4), _batch(n, top_k=2, seed=seeds))
    assert set(top2.tolist()) == {0, 1}
    # mass before token 2 is 0.75 >= 0.7, so top_p=0.7 keeps tokens 0 and 1 only
    nucleus = sample(logits.expand(n, 4), _batch(n, top_p=0.7, seed=seeds))
    assert set(nucleus.tolist()) == {0, 1}


def test_mixed_rows_greedy_and_random():
    logits = torch.randn(2, 30)
    out = sample(logits, _batch(2, temperature=[0.0, 1.0], seed=[1, 2]))
    assert out[0] == logits[0].argmax()


def test_min_p_keeps_the_tokens_at_least_that_fraction_as_likely_as_the_top_one():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    n = 2000
    seeds = list(range(n))
    # min_p=0.5: a token needs p >= 0.25, so 0 (0.5) and 1 (0.3) stay, 2 (0.15) and 3 (0.05) go
    assert set(sample(logits.expand(n, 4), _batch(n, min_p=0.5, seed=seeds)).tolist()) == {0, 1}
    assert set(sample(logits.expand(n, 4), _batch(n, min_p=0.0, seed=seeds)).tolist()) == {0, 1, 2, 3}
    # per row: min_p=1 keeps only the most likely token, whatever the temperature
    mixed = sample(logits.expand(2, 4), _batch(2, temperature=5.0, min_p=[1.0, 0.0], seed=[3, 3]))
    assert mixed[0] == 0


def test_min_p_off_leaves_the_seeded_stream_bit_identical():
    torch.manual_seed(1)
    logits = torch.randn(8, 100)
    seeds, index = list(range(8)), list(range(8))
    default = sample(logits, _batch(8, temperature=0.8, top_k=20, top_p=0.9, seed=seeds, index=index))
    off = sample(logits, _batch(8, temperature=0.8, top_k=20, top_p=0.9, min_p=0.0, seed=seeds, index=index))
    assert torch.equal(default, off)


def test_token_logprobs_are_the_raw_log_softmax_and_its_top_k():
    from stagemesh.model.sampling import token_logprobs

    logits = torch.randn(4, 50) * 3
    tokens = torch.tensor([3, 7, 0, 49])
    chosen, top_ids, top_values = token_logprobs(logits, tokens, 5)
    reference = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(chosen, reference[torch.arange(4), tokens])
    expected = reference.topk(5, dim=-1)
    assert top_ids.tolist() == expected.indices.tolist()
    assert torch.allclose(top_values, expected.values)
    assert top_values[:, 0].tolist() == reference.max(-1).values.tolist()  # most likely first
    _, none_ids, none_values = token_logprobs(logits, tokens, 0)
    assert none_ids.shape == (4, 0) and none_values.shape == (4, 0)
