"""The Summary bytes relu_doctor encodes directly (:mod:`relu_doctor.reports._summary`)
against the protobuf runtime's own messages: byte for byte where protobuf's encoding is
canonical, parsed message for message, on the edges of each field (varint lengths at 127
and 128 bytes, tags that are not ASCII, values beyond float32, signed zeros, NaN)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

from relu_doctor.reports import _summary

TAGS = ["a", "relu_doctor/dead_fraction/net.1", "x" * 120, "y" * 125, "z" * 126, "w" * 300,
        "relu_doctor/sparsity/encoder.layer.0.ffn·gelu", "d/ü/ß/漢字"]
VALUES = [0.0, -0.0, 1.0, -2.5, 0.1, 3.4e38, 1e39, -1e39, 1e-46, math.inf, -math.inf,
          float(np.float32(0.3)), 7, np.float32(0.25), np.float64(1 / 3)]


def runtime_scalars(tags, values) -> Summary:
    return Summary(value=[Summary.Value(tag=t, simple_value=float(v))
                          for t, v in zip(tags, values, strict=True)])


@pytest.mark.parametrize("n", [1, 2, 15, 257])
def test_scalar_values_are_the_runtimes_bytes(n: int) -> None:
    rng = np.random.default_rng(n)
    tags = [TAGS[i % len(TAGS)] + f"/{i}" for i in range(n)]
    values = [VALUES[i % len(VALUES)] if i % 3 else float(rng.normal()) for i in range(n)]
    want = runtime_scalars(tags, values)
    got = _summary.scalar_values(tags, values)
    assert got == want.SerializeToString()
    assert Summary.FromString(got) == want


def test_scalar_values_keep_nan_and_take_an_empty_list() -> None:
    got = Summary.FromString(_summary.scalar_values(["n", "m"], [math.nan, 1.0]))
    assert [v.tag for v in got.value] == ["n", "m"]
    assert math.isnan(got.value[0].simple_value) and got.value[1].simple_value == 1.0
    assert _summary.scalar_values([], []) == b"" == Summary().SerializeToString()
    with pytest.raises(ValueError, match="one per tag"):
        _summary.scalar_values(["a", "b"], [1.0])


@pytest.mark.parametrize("buckets", [0, 1, 15, 16, 17, 40])
def test_histogram_is_the_runtimes_message(buckets: int) -> None:
    """Fields set and unset (proto3 leaves a zero out), a negative zero, bucket lists whose
    packed length is either side of a one-byte varint (16 doubles are 128 bytes)."""
    rng = np.random.default_rng(buckets)
    limits = np.sort(rng.random(buckets))
    counts = rng.integers(0, 1000, buckets).astype(np.float64)
    for lo, hi, num, total, sq in [(0.0, 0.0, 0.0, 0.0, 0.0), (-0.0, 1.0, 3.0, 1.5, 0.75),
                                   (0.25, 0.5, 1e6, 4e5, 1.7e5), (-3.0, math.inf, 2, -1, 10)]:
        want = HistogramProto(min=lo, max=hi, num=num, sum=total, sum_squares=sq,
                              bucket_limit=limits.tolist(), bucket=counts.tolist())
        got = _summary.histogram(lo, hi, num, total, sq, limits, counts.astype(np.int64))
        assert got == want.SerializeToString()
        as_bytes = (limits.astype("<f8").tobytes(), counts.astype("<f8").tobytes())
        assert _summary.histogram(lo, hi, num, total, sq, *as_bytes) == got
        parsed = HistogramProto.FromString(got)
        assert parsed == want and math.copysign(1, parsed.min) == math.copysign(1, lo)


def test_histogram_values_are_the_runtimes_summary() -> None:
    h = [HistogramProto(min=0.1, max=0.9, num=3, sum=1.5, sum_squares=1.07,
                        bucket_limit=[0.5, 1.0], bucket=[1, 2]),
         HistogramProto(num=1, bucket_limit=[0.05], bucket=[1])]
    tags = [TAGS[3], TAGS[-1]]
    want = Summary(value=[Summary.Value(tag=t, histo=x) for t, x in zip(tags, h, strict=True)])
    got = _summary.histogram_values(tags, [x.SerializeToString() for x in h])
    assert got == want.SerializeToString()
    assert Summary.FromString(got) == want
