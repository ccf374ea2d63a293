"""The process-global metrics registry renders the Prometheus text format."""

from __future__ import annotations

import pytest

from runtime.metrics import Registry, counter, histogram


def test_counter_gauge_histogram_render() -> None:
    reg = Registry()
    from runtime.metrics import Counter, Gauge, Histogram

    sent = reg._register(Counter("t_sent_total", "Sent.", ["protocol"]))
    conns = reg._register(Gauge("t_conns", "Open."))
    lat = reg._register(Histogram("t_latency_seconds", "Latency.", buckets=(0.1, 1.0)))
    assert isinstance(sent, Counter) and isinstance(conns, Gauge)
    assert isinstance(lat, Histogram)
    sent.inc(protocol="smtp")
    sent.inc(2, protocol='we"ird')
    conns.inc()
    conns.inc()
    conns.dec()
    for value in (0.05, 0.5, 5.0):
        lat.observe(value)
    text = reg.render()
    assert "# TYPE t_sent_total counter" in text
    assert 't_sent_total{protocol="smtp"} 1\n' in text
    assert 't_sent_total{protocol="we\\"ird"} 2\n' in text
    assert "t_conns 1\n" in text
    assert 't_latency_seconds_bucket{le="0.1"} 1\n' in text
    assert 't_latency_seconds_bucket{le="1"} 2\n' in text
    assert 't_latency_seconds_bucket{le="+Inf"} 3\n' in text
    assert "t_latency_seconds_count 3\n" in text
    assert "t_latency_seconds_sum 5.55\n" in text


def test_registration_is_idempotent_but_checks_shape() -> None:
    first = counter("t_shared_total", "Shared.", ["a"])
    assert counter("t_shared_total", "Shared.", ["a"]) is first
    with pytest.raises(ValueError):
        histogram("t_shared_total", "Shared.", ["a"])
    with pytest.raises(ValueError):
        first.inc(protocol="wrong label")
    with pytest.raises(ValueError):
        first.inc(-1, a="x")
