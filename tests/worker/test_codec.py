"""Message codec: JSON and float32 samples/readings, validation reasons, fast path = strict path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oclust.training_worker.codec import (
    CONTENT_TYPE_F32,
    REASONS,
    DecodeError,
    ReadingDecoder,
    SampleDecoder,
    encode_reading,
    encode_sample,
)

F32 = [("content-type", CONTENT_TYPE_F32.encode())]


def _reason(decoder, value, headers=None) -> str:
    with pytest.raises(DecodeError) as info:
        decoder.decode(value, headers)
    assert info.value.reason in REASONS
    assert str(info.value).startswith(info.value.reason + ": ")
    return info.value.reason


def test_json_sample_with_optional_fields():
    msg = b'{"features": [1, 2.5, -3], "id": "x", "label": 4, "ts": 1}'
    arr, label = SampleDecoder().decode(msg)
    assert arr.dtype == np.float32 and arr.tolist() == [1.0, 2.5, -3.0]
    assert label == 4
    arr, label = SampleDecoder().decode(b'{"features": [[1, 2], [3, 4]]}')
    assert arr.shape == (2, 2) and label == -1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty"),
        (None, "empty"),
        (b"\xff\xfe not json", "not_json"),
        (b"{features: [1, 2]}", "not_json"),
        (b"[1, 2, 3]", "bad_schema"),
        (b'{"feature": [1, 2, 3]}', "bad_schema"),
        (b'{"features": []}', "bad_schema"),
        (b'{"features": 3}', "bad_schema"),
        (b'{"features": [1, 2, 3], "label": "cat"}', "bad_schema"),
        (b'{"features": [1, 2, 3], "label": -2}', "bad_schema"),
        (b'{"features": [1, "2", 3]}', "not_numbers"),
        (b'{"features": [1, true, 3]}', "not_numbers"),
        (b'{"features": [1, null, 3]}', "not_numbers"),
        (b'{"features": [1, NaN, 3]}', "non_finite"),
        (b'{"features": [1, Infinity, 3]}', "non_finite"),
        (b'{"features": [1, 1e39, 3]}', "out_of_range"),  # finite, beyond --max-abs-feature
        (b'{"features": [1, 2]}', "wrong_length"),
        (b'{"features": [[1, 2], [3]]}', "wrong_length"),  # ragged
    ],
)
def test_bad_json_samples_rejected_with_reason(value, reason):
    assert _reason(SampleDecoder(shape=(3,)), value) == reason


def test_oversized_message_rejected():
    value = json.dumps({"features": [1.0] * 1000}).encode()
    assert _reason(SampleDecoder(max_bytes=100), value) == "too_large"


def test_shape_is_learned_from_first_valid_message():
    dec = SampleDecoder()
    assert _reason(dec, b"nope") == "not_json"
    dec.decode(b'{"features": [1, 2]}')
    assert dec.shape == (2,)
    assert _reason(dec, b'{"features": [1, 2, 3]}') == "wrong_length"


def test_binary_sample_round_trip_and_errors():
    value, headers = encode_sample([1.5, -2.0, 3.25], label=7, id="a", ts=3.0, binary=True)
    assert len(value) == 12
    arr, label = SampleDecoder(shape=(3,)).decode(value, headers)
    assert arr.tolist() == [1.5, -2.0, 3.25] and label == 7
    dec = SampleDecoder(shape=(3,))
    assert _reason(dec, value[:-1], F32) == "bad_binary"
    assert _reason(dec, value[:-4], F32) == "wrong_length"
    nan = np.array([1, np.nan, 2], "<f4").tobytes()
    assert _reason(dec, nan, F32) == "non_finite"
    assert _reason(dec, value, [*F32, ("label", b"x")]) == "bad_schema"


def test_forced_encoding_ignores_headers():
    raw = np.arange(4, dtype="<f4").tobytes()
    assert SampleDecoder(encoding="f32").decode(raw)[0].tolist() == [0, 1, 2, 3]
    assert _reason(SampleDecoder(encoding="json"), raw, F32) == "not_json"
    with pytest.raises(ValueError, match="encoding"):
        SampleDecoder(encoding="xml")


def test_batch_fast_path_matches_strict_path_for_good_batches():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 5)).astype(np.float32)
    msgs = [encode_sample(x, label=i % 3) for i, x in enumerate(X)]
    dec = SampleDecoder()
    batch = dec.decode_batch([m[0] for m in msgs], [m[1] for m in msgs])
    assert batch.rejects == []
    np.testing.assert_array_equal(batch.features, X)
    assert batch.labels.tolist() == [i % 3 for i in range(50)]
    binmsgs = [encode_sample(x, label=1, binary=True) for x in X]
    bbatch = dec.decode_batch([m[0] for m in binmsgs], [m[1] for m in binmsgs])
    np.testing.assert_array_equal(bbatch.features, X)
    assert bbatch.labels.tolist() == [1] * 50


good = st.lists(st.floats(-1e6, 1e6, width=32), min_size=3, max_size=3)
bad_values = st.sampled_from([
    b"", b"{", b'{"features": [1, 2]}', b'{"features": [1, true, 2]}', b'{"features": "abc"}',
    b'{"features": [1, 2, NaN]}', b'{"features": [1, 2, 3], "label": false}', b"[]",
    b'{"features": [1, 2, "3"]}', b'{"features": [1, 2, null]}', b'{"x": 1}',
    np.ones(3, "<f4").tobytes(),
])
message = st.one_of(
    good.map(lambda f: (json.dumps({"features": f, "label": 1}).encode(), None)),
    good.map(lambda f: (encode_sample(f, binary=True)[0], F32)),
    bad_values.map(lambda v: (v, None)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(message, min_size=1, max_size=12))
def test_batch_decode_equals_one_by_one(msgs):
    values = [v for v, _ in msgs]
    headers = [h for _, h in msgs]
    batch = SampleDecoder(shape=(3,)).decode_batch(values, headers)
    one = SampleDecoder(shape=(3,))
    ok, rejects = [], []
    for i, (v, h) in enumerate(msgs):
        try:
            ok.append((i, *one.decode(v, h)))
        except DecodeError as exc:
            rejects.append((i, exc.reason))
    assert batch.index.tolist() == [i for i, _, _ in ok]
    assert [(i, e.reason) for i, e in batch.rejects] == rejects
    if ok:
        np.testing.assert_array_equal(batch.features, np.stack([a for _, a, _ in ok]))
        assert batch.labels.tolist() == [lab for _, _, lab in ok]
    assert batch.features.shape == (len(ok), 3)


def test_readings_json_and_binary():
    dec = ReadingDecoder()
    r = dec.decode(b'{"device": "s1", "ts": 2.5, "values": [1, 2, 3], "label": 1}')
    assert (r.device, r.ts, r.values.tolist(), r.label) == ("s1", 2.5, [1.0, 2.0, 3.0], 1)
    assert dec.channels == 3
    r = dec.decode(b'{"values": [4, 5, 6]}', key=b"from-key")
    assert r.device == "from-key" and r.ts is None
    value, headers = encode_reading("s2", [7, 8, 9], ts=1.0, label=0, binary=True)
    r = dec.decode(value, headers)
    assert (r.device, r.ts, r.values.tolist(), r.label) == ("s2", 1.0, [7.0, 8.0, 9.0], 0)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b'{"device": "a", "values": [1, 2]}', "wrong_length"),
        (b'{"values": [1, 2, 3]}', "bad_schema"),  # no device, no key
        (b'{"device": "a", "values": [[1, 2, 3]]}', "bad_schema"),
        (b'{"device": "a", "ts": "now", "values": [1, 2, 3]}', "bad_schema"),
        (b'{"device": "a", "ts": NaN, "values": [1, 2, 3]}', "non_finite"),
        (b'{"device": "a", "ts": 1' + b"0" * 400 + b', "values": [1, 2, 3]}', "out_of_range"),
        (b'{"device": "a", "values": [1, NaN, 3]}', "non_finite"),
        (b'{"device": "a"}', "bad_schema"),
        (b'{"device": ["a"], "values": [1, 2, 3]}', "bad_schema"),
    ],
)
def test_bad_readings_rejected(value, reason):
    with pytest.raises(DecodeError) as info:
        ReadingDecoder(channels=3).decode(value)
    assert info.value.reason == reason


@pytest.mark.parametrize("ts", [b"nan", b"inf", b"-inf", b"NaN"])
def test_a_binary_readings_ts_header_must_be_finite_as_in_json(ts):
    value = np.ones(3, "<f4").tobytes()
    headers = [*F32, ("device", b"a"), ("ts", ts)]
    assert _reason(ReadingDecoder(channels=3), value, headers) == "non_finite"
    ok = ReadingDecoder(channels=3).decode(value, [*F32, ("device", b"a"), ("ts", b"2.5")])
    assert ok.ts == 2.5


def test_encoders_produce_what_decoders_read():
    value, headers = encode_sample(np.ones((2, 3)), label=2)
    arr, label = SampleDecoder().decode(value, headers)
    assert arr.shape == (2, 3) and label == 2
    value, headers = encode_sample(np.ones((2, 3)), binary=True)
    arr, _ = SampleDecoder(shape=(2, 3)).decode(value, headers)
    assert arr.shape == (2, 3)


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (b'{"features": ' + b"[" * 332 + b"1" + b"]" * 332 + b"}", None, "too_deep"),
        (b'{"features": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}", None, "too_deep"),
        (b'{"features": [1, 2], "label": 9223372036854775808}', None, "out_of_range"),
        (b'{"features": [3e38, 2]}', None, "out_of_range"),
        (b'{"features": [1, 100000000000000000000000000000]}', None, "out_of_range"),
        (np.ones(2, "<f4").tobytes(), [("content-type", CONTENT_TYPE_F32.encode()),
                                       ("label", b"99999999999999999999999")], "out_of_range"),
    ],
)
def test_hostile_samples_get_a_reason_in_both_paths(value, headers, reason):
    dec = SampleDecoder(shape=(2,))
    assert _reason(dec, value, headers) == reason
    batch = SampleDecoder(shape=(2,)).decode_batch([value, value], [headers, headers])
    assert [e.reason for _, e in batch.rejects] == [reason, reason]


def test_max_abs_bounds_features_and_readings():
    assert SampleDecoder(max_abs=10.0).decode(b'{"features": [10, -10]}')[0].tolist() == [
        10.0, -10.0]
    assert _reason(SampleDecoder(max_abs=10.0), b'{"features": [10.5]}') == "out_of_range"
    with pytest.raises(DecodeError) as info:
        ReadingDecoder(max_abs=10.0).decode(b'{"device": "a", "values": [1, -11]}')
    assert info.value.reason == "out_of_range"


def test_a_fresh_decoder_takes_the_shape_most_of_its_first_batch_has():
    bad = b'{"features": [1.0]}'  # one malformed message ahead of the stream
    good = [json.dumps({"features": [float(i)] * 8}).encode() for i in range(5)]
    dec = SampleDecoder()
    batch = dec.decode_batch([bad, *good])
    assert dec.shape == (8,) and batch.features.shape == (5, 8)
    assert [(i, e.reason) for i, e in batch.rejects] == [(0, "wrong_length")]
    tie = SampleDecoder()
    tie.decode_batch([bad, good[0]])
    assert tie.shape == (1,)  # a tie: the first message's, as before

    readings = [b'{"device": "a", "values": [1]}',
                *(b'{"device": "a", "values": [1, 2, 3]}' for _ in range(3))]
    rdec = ReadingDecoder()
    rdec.settle_channels(readings, [None] * 4, [None] * 4)
    assert rdec.channels == 3
    assert _reason(rdec, readings[0]) == "wrong_length"


def test_an_ingest_settles_on_the_layout_of_a_whole_fetch_then_decodes_each_partition():
    from types import SimpleNamespace as Msg

    from oclust.training_worker.batching import SampleQueue
    from oclust.training_worker.ingest import ReadingIngest, SampleIngest
    from oclust.training_worker.windows import WindowAssembler

    def msgs(values: list[bytes]) -> list[Msg]:
        return [Msg(offset=i, value=v, headers=None, key=None) for i, v in enumerate(values)]

    stray = msgs([b'{"features": [1.0]}'])  # alone on its partition, decoded first
    good = msgs([json.dumps({"features": [float(i)] * 8}).encode() for i in range(5)])
    ingest = SampleIngest(SampleDecoder(), SampleQueue())
    assert not ingest.settled
    ingest.settle(stray + good)
    assert ingest.settled and ingest.decoder.shape == (8,)
    assert [e.reason for _, e in ingest.decode(0, stray)] == ["wrong_length"]
    assert ingest.decode(1, good) == [] and len(ingest.queue) == 5

    readings = ReadingIngest(ReadingDecoder(), WindowAssembler(4), SampleQueue())
    readings.settle(msgs([b'{"device": "a", "values": [1]}',
                          *(b'{"device": "b", "values": [1, 2, 3]}' for _ in range(3))]))
    assert readings.settled and readings.decoder.channels == 3
