"""The gateway's TTFT / ITL series, counted in bulk, read as prometheus-client's own histograms would be."""

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.latencies import FOLD_AT, KINDS, RECENT_KEPT, TokenLatencies
from gateway.metrics import GatewayMetrics


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith("_created")}


def test_the_exposition_equals_prometheus_clients_histograms_fed_the_same_values():
    rng = random.Random(7)
    reference = CollectorRegistry()
    histograms = {kind: Histogram(name, doc, ("chain",), buckets=buckets, registry=reference)
                  for kind, (name, doc, buckets) in KINDS.items()}
    latencies = TokenLatencies()
    ours = CollectorRegistry()
    ours.register(latencies)
    for chain in ("0", "1"):
        for kind, (_, _, buckets) in KINDS.items():
            # values on the bounds themselves (le: counted in that bucket), between them, past the last
            values = list(buckets) + [rng.uniform(0, 2 * buckets[-1]) for _ in range(500)]
            for value in values:
                histograms[kind].labels(chain).observe(value)
                latencies.add(chain, kind, value)
    expected, got = _samples(generate_latest(reference).decode()), _samples(generate_latest(ours).decode())
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_a_tracker_counts_one_ttft_then_an_itl_per_token_on_its_chain_and_a_second_scrape_adds_nothing():
    metrics = GatewayMetrics()
    tracker = metrics.track()
    tracker.admitted(2)
    for _ in range(5):
        tracker.token()
    first = _samples(generate_latest(metrics.registry).decode())
    assert first[("stagemesh_time_to_first_token_seconds_count", frozenset({("chain", "2")}))] == 1
    assert first[("stagemesh_inter_token_latency_seconds_count", frozenset({("chain", "2")}))] == 4
    assert first[("stagemesh_inter_token_latency_seconds_bucket", frozenset({("chain", "2"), ("le", "+Inf")}))] == 4
    assert _samples(generate_latest(metrics.registry).decode()) == first
    tracker.admitted(3)  # failed over: its next token's gap counts on the new chain
    tracker.token()
    after = _samples(generate_latest(metrics.registry).decode())
    assert after[("stagemesh_inter_token_latency_seconds_count", frozenset({("chain", "3")}))] == 1
    assert after[("stagemesh_inter_token_latency_seconds_count", frozenset({("chain", "2")}))] == 4


def test_unread_values_are_folded_at_fold_at_and_the_history_still_gets_the_latest():
    metrics = GatewayMetrics()
    tracker = metrics.track()
    tracker.admitted(0)
    for _ in range(3 * FOLD_AT + 1):  # nobody scrapes or samples meanwhile
        tracker.token()
    series = metrics.latencies.series("0", "itl")
    assert len(series.pending) < FOLD_AT
    assert sum(series.counts) + len(series.pending) == 3 * FOLD_AT
    taken = metrics.latencies.take("0", "itl")
    assert len(taken) == RECENT_KEPT  # the latest ones
    assert series.pending == [] and sum(series.counts) == 3 * FOLD_AT
    assert metrics.latencies.take("0", "itl") == []

