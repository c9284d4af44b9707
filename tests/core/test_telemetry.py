import pytest

from semblend_core.plan import Outcome
from semblend_core.telemetry import PrometheusExporter, Telemetry


def test_counters_and_unknown_outcome():
    t = Telemetry()
    t.record(Outcome.COLD, "no_candidate")
    t.record(Outcome.MATERIALIZED, "hit", loaded_tokens=100)
    t.record_plan(True, 0.002, 1000)
    snap = t.snapshot()
    assert snap["outcomes"]["cold"] == 1 and snap["outcomes"]["materialized"] == 1 and snap["loaded_tokens"] == 100
    assert snap["plan_latency_ms"]["p50"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        t.record("hit", "x")


def test_prometheus_exporter_mirrors_counters():
    prom = pytest.importorskip("prometheus_client")
    registry = prom.CollectorRegistry()
    t = Telemetry()
    PrometheusExporter(t, registry=registry)
    t.record(Outcome.MATERIALIZED, "hit", loaded_tokens=64)
    t.record(Outcome.DECLINED, "below_min_reuse_ratio")
    assert registry.get_sample_value("semblend_requests_total", {"outcome": "materialized", "reason": "hit"}) == 1
    assert registry.get_sample_value("semblend_loaded_tokens_total") == 64
