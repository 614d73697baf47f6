"""Message formats: decode and validate sample and reading messages, encode them for producers.

Two payload encodings, chosen per message by the ``content-type`` header (or forced for a
whole topic with ``encoding="json"``/``"f32"``):

* **JSON** (default, no header or ``content-type: application/json``)
  - sample: ``{"features": [...], "id": "...", "label": 3, "ts": 1700000000.0}``; only
    ``features`` is required; it may be nested (e.g. ``[[...], ...]`` for a C×T window).
  - reading: ``{"device": "...", "ts": 12.5, "values": [c1, ..., cC], "label": 0}``; ``device``
    falls back to the Kafka key; ``ts`` orders readings (arrival order when absent).
* **binary float32** (``content-type: application/x-oclust-f32``): the value is the sample's
  (or reading's) numbers as little-endian IEEE-754 float32 in C order, nothing else. Optional
  headers carry the rest as ASCII text: ``label`` (integer), ``id``, ``ts`` (float) and, for
  readings, ``device``. Shape comes from the model (or the first valid message), so a binary
  sample must have exactly ``prod(shape) * 4`` bytes.
* **multi-sample float32** (``content-type: application/x-oclust-f32`` plus a ``rows: n``
  header): the value is an n x shape matrix of little-endian float32 in C order (``n *
  prod(shape) * 4`` bytes), decoded zero-copy into n samples. Optional headers: ``shape``
  (the per-sample shape, comma-separated, e.g. ``3,100``; default the model's, or flat) and
  ``labels`` (n comma-separated integers, -1 for none). A wrong size or shape is
  ``wrong_length``, a bad ``rows``/``shape``/``labels`` header ``bad_schema``.

A message that fails is rejected with :class:`DecodeError`, whose ``reason`` is one short code
(used as the DLQ ``reason`` header and as a metric label) and whose message says what is wrong:
``empty``, ``too_large``, ``not_json``, ``bad_schema``, ``not_numbers``, ``non_finite``,
``wrong_length``, ``bad_binary``, ``too_deep`` (nesting beyond :data:`MAX_DEPTH`),
``out_of_range`` (a feature beyond ``max_abs``, default :data:`DEFAULT_MAX_ABS_FEATURE`, or a
label above :data:`MAX_LABEL`) and ``decode_failed`` (anything else the decoder tripped on: the
decoders never raise anything but :class:`DecodeError` for a message).

Example:
    >>> dec = SampleDecoder()
    >>> batch = dec.decode_batch([b'{"features": [1, 2], "label": 1}', b'{"features": [3]}'])
    >>> batch.features.tolist(), batch.labels.tolist(), [(i, e.reason) for i, e in batch.rejects]
    ([[1.0, 2.0]], [1], [(1, 'wrong_length')])
"""

from __future__ import annotations

from oclust.training_worker.codec import base
from oclust.training_worker.codec.base import *  # noqa: F403 (the shared names, listed in base.__all__)
from oclust.training_worker.codec.matrix import decode_matrix, encode_matrix
from oclust.training_worker.codec.readings import Reading, ReadingDecoder, encode_reading
from oclust.training_worker.codec.samples import DecodedBatch, SampleDecoder, encode_sample

# The shared names are listed once, in ``base.__all__``; this package adds the formats' own.
__all__ = [
    *base.__all__,
    "DecodedBatch",
    "Reading",
    "ReadingDecoder",
    "SampleDecoder",
    "decode_matrix",
    "encode_matrix",
    "encode_reading",
    "encode_sample",
]
