"""The log-linear latency histogram's maths: buckets and percentiles.

The kernel side (lat_bucket() in bpf/kvmexit.bpf.c) is checked against
kvmexit.latency_bucket() value by value in test_kernel_detail.py; here the
Python side is checked against exact percentiles of known times."""

import random

import pytest

import kvmexit
from kvmexit import LAT_BUCKETS, LAT_SUB, bucket_bounds, latency_bucket


def nearest_rank(times, percent):
    """The exact percentile: the ceil(percent% * n)-th smallest time."""
    ordered = sorted(times)
    rank = -(-len(ordered) * percent // 100)
    return ordered[rank - 1]


def histogram(times):
    hist = [0] * LAT_BUCKETS
    for t in times:
        hist[latency_bucket(t)] += 1
    return hist


def latency_of(times):
    return kvmexit.Latency(len(times), sum(times), max(times),
                           histogram(times))


def edges():
    """Times at and around every power of two up to the last bucket."""
    for log2 in range(0, kvmexit.LAT_MAX_LOG2 + 2):
        for delta in (-1, 0, 1):
            if (1 << log2) + delta >= 0:
                yield (1 << log2) + delta


def test_every_time_falls_in_a_bucket_whose_bounds_hold_it():
    times = list(range(5000)) + [
        t for t in edges() if t < 1 << kvmexit.LAT_MAX_LOG2] + \
        [random.Random(1).randrange(1 << 36) for _ in range(5000)]
    for t in times:
        bucket = latency_bucket(t)
        low, high = bucket_bounds(bucket)
        assert 0 <= bucket < LAT_BUCKETS
        assert low <= t <= high, (t, bucket, low, high)


def test_buckets_tile_the_range_without_gaps_or_overlaps():
    expected_low = 0
    for bucket in range(LAT_BUCKETS):
        low, high = bucket_bounds(bucket)
        assert low == expected_low
        assert latency_bucket(low) == latency_bucket(high) == bucket
        expected_low = high + 1
    assert expected_low == 1 << kvmexit.LAT_MAX_LOG2


def test_at_least_eight_buckets_per_power_of_two_each_at_most_an_eighth():
    assert LAT_SUB >= 8
    for bucket in range(2 * LAT_SUB, LAT_BUCKETS):
        low, high = bucket_bounds(bucket)
        assert (high - low + 1) * 8 <= low, bucket
    for log2 in range(4, kvmexit.LAT_MAX_LOG2 - 1):
        assert latency_bucket(2 << log2) - latency_bucket(1 << log2) == \
            LAT_SUB


def test_times_beyond_the_range_share_the_last_bucket():
    assert latency_bucket(1 << kvmexit.LAT_MAX_LOG2) == LAT_BUCKETS - 1
    assert latency_bucket(1 << 62) == LAT_BUCKETS - 1


def test_small_times_have_a_bucket_each():
    assert [latency_bucket(t) for t in range(16)] == list(range(16))
    assert [bucket_bounds(b) for b in range(16)] == [(b, b)
                                                     for b in range(16)]


def spread(name, rng):
    """Known handling times of a few shapes, in ns."""
    if name == "constant":
        return [2345] * 1000
    if name == "uniform":
        return [rng.randrange(500, 50000) for _ in range(10000)]
    if name == "lognormal":
        return [int(rng.lognormvariate(8, 1.5)) + 1 for _ in range(20000)]
    if name == "bimodal":
        # Exits handled in KVM, and the few that go out to user space.
        return [rng.randrange(800, 1200) for _ in range(9500)] + \
            [rng.randrange(40000, 90000) for _ in range(500)]
    if name == "tiny":
        return [rng.randrange(0, 40) for _ in range(3000)]
    if name == "bucket_edges":
        return list(edges())[:100] * 3
    raise ValueError(name)


@pytest.mark.parametrize("shape", ["constant", "uniform", "lognormal",
                                   "bimodal", "tiny", "bucket_edges"])
def test_p50_p90_p99_within_a_sixteenth_of_the_exact_times(shape):
    times = spread(shape, random.Random(shape))
    lat = latency_of(times)
    for percent in (50, 90, 99):
        exact = nearest_rank(times, percent)
        estimate = lat.percentile_ns(percent)
        # The middle of a bucket at most 1/8 of its lower bound wide.
        assert abs(estimate - exact) <= exact / (2 * LAT_SUB), \
            (percent, exact, estimate)


def test_percentiles_of_one_time_are_that_time():
    lat = latency_of([123456])
    assert [lat.percentile_ns(p) for p in (50, 90, 99)] == [123456] * 3


def test_a_percentile_never_exceeds_the_maximum():
    # 100 exits at 1000 ns: bucket [960, 1023]; its middle is 991, the
    # maximum (1000) is exact.
    lat = latency_of([1000] * 100)
    assert latency_bucket(1000) == latency_bucket(960)
    assert lat.percentile_ns(99) == 991
    lat = latency_of([990] * 100)
    assert lat.percentile_ns(99) == 990


def test_percentiles_of_known_ranks():
    # 100 times 1..100 us: P50 is the 50th, P90 the 90th, P99 the 99th.
    times = [us * 1000 for us in range(1, 101)]
    lat = latency_of(times)
    got = [lat.percentile_ns(p) for p in (50, 90, 99)]
    for estimate, exact in zip(got, (50000, 90000, 99000)):
        low, high = bucket_bounds(latency_bucket(exact))
        assert estimate == min((low + high) // 2, 100000)


def test_no_exits_no_percentile():
    assert kvmexit.Latency(0, 0, 0, [0] * LAT_BUCKETS).percentile_ns(99) == 0


def test_an_interval_keeps_the_percentiles_of_its_own_exits():
    first = latency_of([1000] * 10)
    both = first + latency_of([50000] * 90)
    interval = both.since(first)
    assert interval.count == 90
    assert interval.percentile_ns(50) == 50000
