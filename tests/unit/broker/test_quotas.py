"""Per-tenant quotas (``broker/quotas.py``), pure: counts refuse naming the quota, the
operator has none, node totals hold for everyone, rates throttle by a token bucket whose
debt is paid back at the rate."""

from __future__ import annotations

import pytest

from broker.config import QuotasConfig, TenantQuotas
from broker.errors import QuotaExceeded
from broker.quotas import UNLIMITED, Quotas, RateBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_count_is_refused_naming_the_quota_and_what_is_held() -> None:
    quotas = Quotas(QuotasConfig(topics=2))
    acme = quotas.of("acme")
    quotas.admit(acme, "topics", 2)
    acme.topics = 2
    with pytest.raises(QuotaExceeded) as info:
        quotas.admit(acme, "topics")
    assert info.value.quota == "topics"
    assert "quotas.topics" in info.value.message and "holds 2" in info.value.message
    assert info.value.http_status == 429 and not info.value.retriable
    assert acme.refused == {"topics": 1}


def test_overrides_apply_per_tenant_and_zero_is_unlimited() -> None:
    cfg = QuotasConfig(groups=5, tenants=[TenantQuotas(tenant="big", groups=0, topics=9)])
    quotas = Quotas(cfg)
    assert quotas.of("big").limits["groups"] == UNLIMITED
    assert quotas.of("big").limits["topics"] == 9
    assert quotas.of("small").limits["groups"] == 5
    assert quotas.of("small").limits["topics"] == cfg.topics


def test_the_operator_has_no_quotas_but_the_node_totals_hold() -> None:
    quotas = Quotas(QuotasConfig(topics=1, node_topics=3, produce_bytes_per_second=10))
    op = quotas.of("*")
    op.topics = 1_000_000
    quotas.admit(op, "topics", 10)
    assert op.produce is None
    quotas.node_topics = 3
    with pytest.raises(QuotaExceeded) as info:
        quotas.admit_node(1, 1)
    assert info.value.quota == "node-topics"


def test_a_bucket_lets_a_burst_through_then_holds_to_the_rate() -> None:
    bucket = RateBucket(rate=1000, capacity=500, now=0.0)
    assert bucket.charge(500, 0.0) == 0.0  # the burst
    assert bucket.charge(1000, 0.0) == pytest.approx(1.0)  # 1000 bytes of debt at 1000/s
    assert bucket.delay(0.5) == pytest.approx(0.5)
    assert bucket.delay(1.0) == 0.0
    assert bucket.delay(100.0) == 0.0 and bucket.tokens == 500  # never saves more than the burst


def test_throttle_times_are_capped_but_the_debt_stays() -> None:
    clock = Clock()
    quotas = Quotas(
        QuotasConfig(produce_bytes_per_second=100, rate_burst_ms=1000, max_throttle_ms=2000),
        clock=clock,
    )
    acme = quotas.of("acme")
    assert quotas.throttle_produce(acme, 100) == 0.0
    assert quotas.throttle_produce(acme, 1000) == 2.0  # 10 s of debt, capped per answer
    assert quotas.throttle_produce(acme, 0) == 2.0  # the next answer waits too
    clock.now += 10
    assert quotas.throttle_produce(acme, 0) == 0.0
    assert acme.produced_bytes == 1100 and acme.throttle_ms["produce"] == 4000


def test_a_fetch_waits_for_earlier_fetches_debt_before_reading() -> None:
    clock = Clock()
    quotas = Quotas(QuotasConfig(fetch_bytes_per_second=1000, rate_burst_ms=100), clock=clock)
    acme = quotas.of("acme")
    assert quotas.throttle_fetch(acme) == 0.0
    quotas.fetched(acme, 2100)  # 100 of burst, then 2000 of debt
    assert quotas.throttle_fetch(acme) == pytest.approx(2.0)
    clock.now += 2
    assert quotas.throttle_fetch(acme) == 0.0
    assert quotas.throttle_fetch(quotas.of("beta")) == 0.0  # other tenants are not held
