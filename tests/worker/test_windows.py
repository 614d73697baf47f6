"""Per-device sliding windows from readings: shape, order, hop, late readings, pending offsets."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from oclust.model.datasets import load_daphnet
from oclust.training_worker.codec import DecodeError, Reading
from oclust.training_worker.windows import WindowAssembler


def _expected(stream: np.ndarray, size: int, hop: int) -> np.ndarray:
    """(n_windows, C, size) windows of a (T, C) stream, starts every ``hop``."""
    return sliding_window_view(stream, size, axis=0)[::hop]


@pytest.fixture(scope="module")
def daphnet() -> np.ndarray:
    return load_daphnet()[0]


@pytest.mark.parametrize(("size", "hop"), [(64, 32), (50, 50), (10, 25)])
def test_daphnet_devices_interleaved_give_each_device_its_own_windows(daphnet, size, hop):
    readings = daphnet
    parts = {f"dev{d}": readings[d * 1000 : (d + 1) * 1000] for d in range(3)}
    asm = WindowAssembler(size=size, hop=hop)
    got: dict[str, list] = {d: [] for d in parts}
    for t in range(1000):  # the three devices send one reading each per tick
        for d, stream in parts.items():
            for w in asm.push(Reading(d, t / 64, stream[t])):
                got[w.device].append(w)
    for d, stream in parts.items():
        want = _expected(stream, size, hop)
        assert len(got[d]) == len(want)
        np.testing.assert_array_equal(np.stack([w.data for w in got[d]]), want)
        assert all(w.data.shape == (9, size) and w.data.dtype == np.float32 for w in got[d])
        starts = [w.start_ts for w in got[d]]
        assert starts == sorted(starts)
        assert starts[1] - starts[0] == pytest.approx(hop / 64)


def test_out_of_order_readings_are_sorted_by_time():
    asm = WindowAssembler(size=4, hop=4)
    order = [1, 0, 3, 2]
    out = []
    for t in order:
        out += asm.push(Reading("a", float(t), np.array([t], np.float32)))
    assert len(out) == 1
    assert out[0].data.tolist() == [[0.0, 1.0, 2.0, 3.0]]


def test_readings_without_time_keep_arrival_order():
    asm = WindowAssembler(size=3)
    out = []
    for v in [5, 3, 4]:
        out += asm.push(Reading("a", None, np.array([v], np.float32)))
    assert out[0].data.tolist() == [[5.0, 3.0, 4.0]] and out[0].start_ts is None


@pytest.mark.parametrize("hop", [1, 3, 5])  # overlapping, the default (= size), a gap
def test_late_reading_is_rejected(hop):
    asm = WindowAssembler(size=3, hop=hop)
    out = []
    for t in range(3):
        out += asm.push(Reading("a", float(t), np.zeros(1, np.float32)))
    assert len(out) == 1  # with hop >= size nothing is left open: the last window is the floor
    with pytest.raises(DecodeError) as info:
        asm.push(Reading("a", 0.5, np.zeros(1, np.float32)))
    assert info.value.reason == "late_reading"
    asm.push(Reading("b", 0.5, np.zeros(1, np.float32)))  # other devices are unaffected
    asm.push(Reading("a", 2.0, np.zeros(1, np.float32)))  # a tie with the floor is not late


def test_window_label_is_majority_and_sources_are_min_offsets():
    asm = WindowAssembler(size=3)
    out = []
    for i, lab in enumerate([1, 0, 1]):
        reading = Reading("a", float(i), np.zeros(2, np.float32), lab)
        out += asm.push(reading, source=(i % 2, 10 + i))
    assert out[0].label == 1
    assert out[0].sources == {0: 10, 1: 11}


def test_pending_tracks_buffered_readings_per_partition():
    asm = WindowAssembler(size=3, hop=2)
    asm.push(Reading("a", 0.0, np.zeros(1, np.float32)), source=(0, 100))
    asm.push(Reading("b", 0.0, np.zeros(1, np.float32)), source=(1, 7))
    asm.push(Reading("a", 1.0, np.zeros(1, np.float32)), source=(0, 101))
    assert asm.pending() == {0: 100, 1: 7}
    assert asm.push(Reading("a", 2.0, np.zeros(1, np.float32)), source=(0, 102))
    assert asm.pending() == {0: 102, 1: 7}  # after hop 2, only ts=2 remains for device a
    asm.forget_partitions({1})
    assert asm.pending() == {0: 102}
    assert asm.devices == 1


def test_a_revocation_keeps_the_state_of_the_other_partitions_devices():
    # every device with an empty buffer was dropped: its late floor with it, so a late reading
    # of a partition still held was taken in after each rebalance
    asm = WindowAssembler(size=2)
    asm.push(Reading("a", 0.0, np.zeros(1, np.float32)), source=(0, 0))
    assert asm.push(Reading("a", 1.0, np.zeros(1, np.float32)), source=(0, 1))  # emitted
    asm.push(Reading("b", 0.0, np.zeros(1, np.float32)), source=(1, 0))
    asm.forget_partitions({1})
    assert asm.devices == 1  # b's only reading was revoked; a keeps its (empty) state
    with pytest.raises(DecodeError, match="late"):
        asm.push(Reading("a", 0.5, np.zeros(1, np.float32)), source=(0, 2))


def test_idle_devices_are_dropped():
    asm = WindowAssembler(size=10, idle_after=5)
    asm.push(Reading("quiet", 0.0, np.zeros(1, np.float32)), source=(0, 0))
    for t in range(10):
        asm.push(Reading("busy", float(t), np.zeros(1, np.float32)), source=(0, t + 1))
    assert asm.buffered("quiet") == 0  # nothing during 3 pushes
    assert asm.pending() == {}


@pytest.mark.parametrize("before", range(3))
def test_a_device_goes_idle_after_idle_after_pushes_wherever_the_count_stands(before):
    # checked every idle_after pushes, a device lasted 3 to 5 of them here, by where the count
    # stood: a resumed worker, counting from 0, dropped devices the first run kept
    asm = WindowAssembler(size=10, idle_after=3)
    for t in range(before):
        asm.push(Reading("other", float(t), np.zeros(1, np.float32)))
    asm.push(Reading("quiet", 0.0, np.zeros(1, np.float32)))
    for t in range(3):
        assert asm.buffered("quiet") == 1
        asm.push(Reading("busy", float(t), np.zeros(1, np.float32)))
    assert asm.buffered("quiet") == 0  # nothing during 3 pushes


@pytest.mark.parametrize(("size", "hop"), [(0, 1), (3, 0)])
def test_bad_parameters(size, hop):
    with pytest.raises(ValueError, match="at least 1"):
        WindowAssembler(size=size, hop=hop)
