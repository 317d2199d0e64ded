"""The delivery latency buckets (``notify/latency.py``): cumulative, +Inf last, sum kept."""

from __future__ import annotations

from notify.latency import BUCKETS, Latency


def test_observations_fall_in_the_first_bucket_at_or_above_them() -> None:
    lat = Latency()
    lat.observe(0.005)  # on a bound: that bucket (le is "less or equal")
    lat.observe(0.3, n=2)
    lat.observe(7200.0)  # past every bound: only +Inf
    lat.observe(-1.0)  # a clock stepped back: no wait
    got = dict(lat.cumulative())
    assert got["0.005"] == 2 and got["0.25"] == 2 and got["0.5"] == 4
    assert got["3600.0"] == 4 and got["+Inf"] == 5
    assert list(got)[-1] == "+Inf" and len(got) == len(BUCKETS) + 1
    assert lat.count == 5 and abs(lat.sum_s - (0.005 + 0.6 + 7200.0)) < 1e-9
