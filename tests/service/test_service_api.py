"""The HTTP API through httpx's ASGI transport: every endpoint and every bad-input case."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from oclust.model import OnlineClusterer, Snapshot
from oclust.service.app import create_app
from oclust.service.decoding import InputError, decode_binary, decode_features
from oclust.service.loader import LoadedModel, ModelHolder
from oclust.service.settings import ServiceSettings

K = 3
F32_MAX = float(np.finfo(np.float32).max)


def _fit(shape: tuple[int, ...], seed: int = 0, clip: float | None = 5.0) -> OnlineClusterer:
    rng = np.random.default_rng(seed)
    clf = OnlineClusterer(n_clusters=K, latent_dim=8, hidden=(16,), seed=seed, device="cpu",
                          clip=clip)
    for _ in range(2):
        clf.partial_fit(rng.normal(size=(64, *shape)).astype("float32"))
    return clf


@pytest.fixture(scope="module")
def vector_snapshot() -> Snapshot:
    return _fit((5,)).to_snapshot().with_version(7)


@pytest.fixture(scope="module")
def window_snapshot() -> Snapshot:
    return _fit((2, 12)).to_snapshot().with_version(3)


def _holder(snapshot: Snapshot | None) -> ModelHolder:
    holder = ModelHolder()
    if snapshot is not None:
        holder.swap(LoadedModel.from_snapshot(snapshot))
    return holder


class Client:
    """Synchronous calls into the app over httpx.ASGITransport (app exceptions propagate)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(go())

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)


def _client(snapshot: Snapshot | None, **overrides: Any) -> Client:
    return Client(create_app(ServiceSettings(**overrides), _holder(snapshot)))


@pytest.fixture(scope="module")
def image_snapshot() -> Snapshot:
    return _fit((1, 8, 8)).to_snapshot().with_version(4)


@pytest.fixture
def api(vector_snapshot: Snapshot) -> Client:
    return _client(vector_snapshot, max_batch=8, max_body_bytes=4096)


@pytest.fixture
def window_api(window_snapshot: Snapshot) -> Client:
    return _client(window_snapshot)


# --------------------------------------------------------------------------- happy paths
def test_assign_matches_the_clusterer(api: Client, vector_snapshot: Snapshot) -> None:
    clf = OnlineClusterer.from_snapshot(vector_snapshot, device="cpu")
    x = np.random.default_rng(5).normal(size=(6, 5)).astype("float32")
    labels, dists = clf.assign(x)
    for i in range(6):
        r = api.post("/assign", json={"features": x[i].tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["cluster"] == labels[i] and body["version"] == 7
        assert body["distance"] == pytest.approx(dists[i], rel=1e-4, abs=1e-5)


def test_batch_matches_the_clusterer_in_order(api: Client, vector_snapshot: Snapshot) -> None:
    clf = OnlineClusterer.from_snapshot(vector_snapshot, device="cpu")
    x = np.random.default_rng(6).normal(size=(8, 5)).astype("float32")
    labels, dists = clf.assign(x)
    r = api.post("/assign/batch", json={"items": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["clusters"] == labels.tolist() and body["version"] == 7
    assert body["distances"] == pytest.approx(dists.tolist(), rel=1e-4, abs=1e-5)


def test_integer_features_and_extra_fields_are_fine(api: Client) -> None:
    r = api.post("/assign", json={"features": [1, 2, 3, 4, 5], "id": "dev-1", "label": 2})
    assert r.status_code == 200 and 0 <= r.json()["cluster"] < K


def test_window_model_takes_nested_or_flat_samples(
    window_api: Client, window_snapshot: Snapshot
) -> None:
    clf = OnlineClusterer.from_snapshot(window_snapshot, device="cpu")
    x = np.random.default_rng(7).normal(size=(4, 2, 12)).astype("float32")
    labels, _ = clf.assign(x)
    nested = window_api.post("/assign", json={"features": x[0].tolist()})
    flat = window_api.post("/assign", json={"features": x[0].ravel().tolist()})
    assert nested.status_code == flat.status_code == 200
    assert nested.json() == flat.json() and nested.json()["cluster"] == labels[0]
    batch = window_api.post("/assign/batch", json={"items": x.tolist()})
    assert batch.status_code == 200 and batch.json()["clusters"] == labels.tolist()
    wrong = window_api.post("/assign", json={"features": x[0].T.tolist()})
    assert wrong.status_code == 422 and "shape [2, 12]" in wrong.json()["detail"]


def test_image_samples_with_optional_fields_are_assigned(image_snapshot: Snapshot) -> None:
    # any string or true/false/null in the body sends it to the element-wise check, which
    # knew vectors and C×T matrices only: a C×H×W sample was refused as "not a number"
    api = _client(image_snapshot)
    x = np.random.default_rng(8).normal(size=(1, 8, 8)).round(3).tolist()
    want = api.post("/assign", json={"features": x}).json()
    for extra in ({"id": "s-17"}, {"label": None}, {"label": 3, "ok": True}):
        r = api.post("/assign", json={"features": x, **extra})
        assert r.status_code == 200 and r.json() == want, (extra, r.text)
    flat = api.post("/assign", json={"features": np.ravel(x).tolist(), "id": "s-17"})
    assert flat.status_code == 200 and flat.json() == want
    batch = api.post("/assign/batch", json={"items": [x, x], "id": "b"})
    assert batch.status_code == 200 and batch.json()["clusters"] == [want["cluster"]] * 2
    bad = [[row[:] for row in x[0]]]
    bad[0][2][5] = "7"
    r = api.post("/assign", json={"features": bad, "id": "s-17"})
    assert r.status_code == 422 and "features[0][2][5]: Input should be a valid number" in (
        r.json()["detail"])
    r = api.post("/assign", json={"features": [x], "id": "s-17"})  # one level too deep
    assert r.status_code == 422 and "features[0][0][0]: Input should be a valid number" in (
        r.json()["detail"])


def test_model_healthz_readyz(api: Client, vector_snapshot: Snapshot) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["version"] == 7
    manifest = api.get("/model")
    assert manifest.status_code == 200 and manifest.json() == vector_snapshot.manifest


# --------------------------------------------------------------------------- bad input
BAD_SINGLE = [
    (b'{"features": [1, 2, 3, 4, NaN]}', "features[4]: NaN or infinite"),
    (b'{"features": [Infinity, 2, 3, 4, 5]}', "features[0]: NaN or infinite"),
    (b'{"features": [1, 2, 3, -Infinity, 5]}', "features[3]: NaN or infinite"),
    (b'{"features": [1, 2, 3, 4, 1e39]}', "out_of_range: 1e+39 exceeds the feature bound"),
    (b'{"features": [1, 2, 3, 4, 2000000]}', "features[4]: out_of_range"),
    (b'{"features": [1, 2, 3, 4, 1e400]}', "features[4]: NaN or infinite"),
    (b'{"features": [1, 2, 3, 4, 1' + b"0" * 400 + b']}',  # beyond a float: was a 500
     "features[4]: out_of_range: ~1e+400 exceeds"),
    (b'{"features": [1, 2, 3, 4, -1' + b"0" * 400 + b']}', "out_of_range: ~-1e+400 exceeds"),
    (b'{"features": [1, 2, 3, 4, "5"]}', "features[4]: Input should be a valid number"),
    (b'{"features": [1, 2, true, 4, 5]}', "features[2]: Input should be a valid number"),
    (b'{"features": [1, 2, 3, 4, null]}', "features[4]: Input should be a valid number"),
    (b'{"features": [1, 2, 3, 4]}', "must have shape [5] (or be a flat list of 5 numbers)"),
    (b'{"features": [1, 2, 3, 4, 5, 6]}', "got shape [6]"),
    (b'{"features": [[1, 2, 3, 4, 5]]}', "got shape [1, 5]"),
    (b'{"features": [[1, 2, 3, 4, 5]], "id": "x"}', "got shape [1, 5]"),
    (b'{"features": [[[1, 2, 3, 4, 5]]], "id": "x"}', "features[0][0]: Input should be a valid"),
    # the bound is checked on the value sent, not on its float32 rounding (1e6 exactly)
    (b'{"features": [1000000.03, 2, 3, 4, 5]}', "features[0]: out_of_range: 1000000.03"),
    (b'{"features": [1000000.03, 2, 3, 4, 5], "id": "x"}', "features[0]: out_of_range"),
    (b'{"features": [[1, 2], [3]]}', "rows of a C×T sample must all have the same length"),
    (b'{"features": [[1, 2], 3]}', "features[1]: Input should be a valid array"),
    (b'{"features": []}', "features: empty"),
    (b'{"features": 5}', "features: Input should be a valid array"),
    (b'{"features": {"a": 1}}', "features: Input should be a valid array"),
    (b'{"features": "1,2,3,4,5"}', "features: Input should be a valid array"),
    (b"{}", "features: required field is missing"),
    (b'{"feature": [1, 2, 3, 4, 5]}', "features: required field is missing"),
    (b"[1, 2, 3, 4, 5]", "Input should be an object"),
    (b"", "Invalid JSON"),
    (b"not json", "Invalid JSON"),
    (b'{"features": [1, 2, 3, 4, 5]', "Invalid JSON"),
    (b"\xff\xfe\x00", "Invalid JSON"),
]


@pytest.mark.parametrize(("body", "message"), BAD_SINGLE)
def test_bad_single_input_is_422_with_a_message(api: Client, body: bytes, message: str) -> None:
    r = api.post("/assign", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


BAD_BATCH = [
    (b'{"items": []}', "items: empty"),
    (b'{"items": [[]]}', "items: empty items"),
    (b'{"items": [[1, 2, 3, 4, 5], [1, 2, 3, 4]]}', "items[1] has [4]"),
    (b'{"items": [[1, 2, 3, 4, 5], [1, 2, 3, 4, NaN]]}', "items[1][4]: NaN or infinite"),
    (b'{"items": [[1, 2, 3, 4, 5], [1, 2, 3, 4, "x"]]}', "items[1][4]: Input should be a valid"),
    (b'{"items": [[1, 2, 3, 4, 5], [1, false, 3, 4, 5]]}', "items[1][1]: Input should be a valid"),
    (b'{"items": [1, 2, 3, 4, 5]}', "items[0]: Input should be a valid array"),
    (b'{"items": [[1, 2, 3]]}', "each item must have shape [5]"),
    (b'{"items": "a"}', "items: Input should be a valid array"),
    (b'{"features": [1, 2, 3, 4, 5]}', "items: required field is missing"),
    (json.dumps({"items": [[0.0] * 5] * 9}).encode(), "9 items exceed the batch limit of 8"),
    (json.dumps({"items": [[0.0] * 5] * 8 + [[True] * 5]}).encode(), "exceed the batch limit"),
    (b'{"items": [[1e38, 1e38, 1e38, 1e38, 1e38]]}', "items[0][0]: out_of_range"),
    (b'{"items": [[1, 2, 3, 4, 9' + b"9" * 400 + b']]}', "items[0][4]: out_of_range"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BATCH)
def test_bad_batch_input_is_422_with_a_message(api: Client, body: bytes, message: str) -> None:
    r = api.post("/assign/batch", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


def test_values_too_large_for_the_model_are_422_not_500(vector_snapshot: Snapshot) -> None:
    unclipped = _fit((5,), clip=None).to_snapshot().with_version(1)
    api = _client(unclipped, max_abs_feature=F32_MAX)  # past the bound, into the model
    r = api.post("/assign", json={"features": [1e38] * 5})
    assert r.status_code == 422 and "values too large" in r.json()["detail"]
    api = _client(vector_snapshot, max_abs_feature=F32_MAX)  # the default clips at 5 std
    r = api.post("/assign", json={"features": [1e38] * 5})
    assert r.status_code == 200 and r.json()["distance"] >= 0


@pytest.mark.parametrize("bound", [math.inf, math.nan, 1e39, "Infinity"])
def test_the_feature_bound_is_finite_and_within_float32(bound: object) -> None:
    with pytest.raises(ValueError, match=r"finite number|less than or equal"):
        ServiceSettings(max_abs_feature=bound)  # inf served Infinity and 1e39 (clipped)


def test_infinite_values_are_422_whatever_the_bound(vector_snapshot: Snapshot) -> None:
    # finiteness is its own check, not a side effect of the bound
    model = LoadedModel.from_snapshot(vector_snapshot)
    for body in (b'{"features": [Infinity, 2, 3, 4, 5]}', b'{"features": [1e39, 2, 3, 4, 5]}'):
        with pytest.raises(InputError, match=r"features\[0\]: (NaN or infinite|out_of_range)"):
            decode_features(body, model.input_shape, math.inf)
    raw = np.array([[np.inf, 2, 3, 4, 5]], "<f4").tobytes()
    with pytest.raises(InputError, match="NaN or infinite float32"):
        decode_binary(raw, model.input_shape, 8, math.inf)


def test_out_of_range_features_are_422_with_the_error_type(api: Client) -> None:
    r = api.post("/assign", json={"features": [1, 2, 3, 4, -3e38]})
    assert r.status_code == 422
    assert r.json()["errors"] == [{"loc": ["features", 4], "type": "out_of_range",
                                   "msg": r.json()["errors"][0]["msg"]}]
    assert api.post("/assign", json={"features": [1, 2, 3, 4, 1e6]}).status_code == 200


def test_validation_stops_at_the_first_errors(api: Client) -> None:
    body = json.dumps({"items": [[""] * 5] * 8}).encode()
    r = api.post("/assign/batch", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and len(r.json()["errors"]) == 5
    assert "stopped at the first 5 errors" in r.json()["detail"]


@pytest.mark.parametrize("kind", [None, "text/plain", "application/x-www-form-urlencoded",
                                  "multipart/form-data; boundary=x"])
def test_posts_need_a_json_or_binary_content_type(api: Client, kind: str | None) -> None:
    headers = {} if kind is None else {"content-type": kind}
    for path in ("/assign", "/assign/batch"):
        r = api.post(path, content=b'{"features": [1, 2, 3, 4, 5]}', headers=headers)
        assert r.status_code == 415 and "application/json" in r.json()["detail"]
    ok = {"content-type": "application/json; charset=utf-8"}
    assert api.post("/assign", content=b'{"features": [1, 2, 3, 4, 5]}',
                    headers=ok).status_code == 200


# --------------------------------------------------------------------------- binary batches
RAW = {"content-type": "application/octet-stream"}


def test_binary_batch_matches_the_json_answer(api: Client) -> None:
    x = np.random.default_rng(3).normal(size=(6, 5)).astype("<f4")
    want = api.post("/assign/batch", json={"items": x.tolist()}).json()
    raw_in = api.post("/assign/batch", content=x.tobytes(), headers=RAW)
    assert raw_in.status_code == 200 and raw_in.json()["clusters"] == want["clusters"]
    both = api.post("/assign/batch", content=x.tobytes(),
                    headers={**RAW, "accept": "application/octet-stream"})
    assert both.status_code == 200 and both.headers["content-type"] == "application/octet-stream"
    assert both.headers["x-oclust-version"] == str(want["version"])
    assert both.headers["x-oclust-count"] == "6" and len(both.content) == 6 * 8
    clusters = np.frombuffer(both.content[:24], "<i4")
    distances = np.frombuffer(both.content[24:], "<f4")
    assert clusters.tolist() == want["clusters"]
    np.testing.assert_allclose(distances, want["distances"], rtol=1e-6)
    json_in = api.post("/assign/batch", json={"items": x.tolist()},
                       headers={"accept": "application/octet-stream"})
    assert json_in.content == both.content


def test_binary_single_sample(api: Client) -> None:
    x = np.arange(5, dtype="<f4")
    r = api.post("/assign", content=x.tobytes(), headers=RAW)
    assert r.status_code == 200
    assert r.json() == api.post("/assign", json={"features": x.tolist()}).json()
    two = api.post("/assign", content=np.zeros((2, 5), "<f4").tobytes(), headers=RAW)
    assert two.status_code == 422 and "batch limit" not in two.json()["detail"]
    assert "/assign takes one sample; send several to /assign/batch" in two.json()["detail"]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"", 422, "empty"),
    (b"\0" * 21, 422, "not a whole number of samples"),
    (np.zeros((9, 5), "<f4").tobytes(), 422, "9 items exceed the batch limit of 8"),
    (np.full((1, 5), np.nan, "<f4").tobytes(), 422, "sample[0][0]: NaN or infinite float32"),
    (np.full((1, 5), 3e38, "<f4").tobytes(), 422, "out_of_range"),
    (np.zeros((300, 5), "<f4").tobytes(), 413, "limit is 4096 bytes"),
])
def test_bad_binary_batches(api: Client, body: bytes, status: int, message: str) -> None:
    r = api.post("/assign/batch", content=body, headers=RAW)
    assert r.status_code == status and message in r.json()["detail"], r.text
    assert "JSON" not in r.json()["detail"]  # the body was not JSON


def test_body_over_the_limit_is_413_by_header(api: Client) -> None:
    body = json.dumps({"features": [1.0] * 5, "pad": "x" * 5000}).encode()
    r = api.post("/assign", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit is 4096 bytes" in r.json()["detail"]


def test_body_over_the_limit_is_413_while_streaming(api: Client) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"features": [1, 2, 3, 4, 5], "pad": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = api.post("/assign", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "sent" in r.json()["detail"]


def test_streamed_body_under_the_limit_is_fine(api: Client) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"features": [1, 2, '
        yield b"3, 4, 5]}"

    headers = {"content-type": "application/json"}
    assert api.post("/assign", content=chunks(), headers=headers).status_code == 200


def _raw_call(app: Any, path: str, messages: list[dict[str, Any]], **headers: str) -> list[Any]:
    """Drive the ASGI app with the given receive messages; returns what it sent."""
    sent: list[dict[str, Any]] = []

    async def go() -> None:
        scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
                 "root_path": "", "headers": [(k.replace("_", "-").encode(), v.encode())
                                              for k, v in headers.items()]}
        queue = list(messages)

        async def receive() -> dict[str, Any]:
            if queue:
                return queue.pop(0)
            await asyncio.sleep(3600)  # a client that never sends the rest
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)

    asyncio.run(go())
    return sent


def _requests(app: Any) -> dict[tuple[str, str], float]:
    text = app.state.metrics.render().decode()
    return {(s.labels["endpoint"], s.labels["status"]): s.value
            for f in text_string_to_metric_families(text) if f.name == "oclust_http_requests"
            for s in f.samples if s.name.endswith("_total")}


def test_every_routed_path_is_counted_under_its_own_endpoint(vector_snapshot: Snapshot) -> None:
    from oclust.service.middleware import ENDPOINTS

    app = create_app(ServiceSettings(), _holder(vector_snapshot))
    routed = {getattr(r, "path", None) for r in app.routes} - {None}
    assert routed - {"/docs/oauth2-redirect", "/redoc"} <= ENDPOINTS  # /stats/map was "other"
    api = Client(app)
    assert api.get("/stats/map").status_code == 200 and api.get("/nowhere").status_code == 404
    counts = _requests(app)
    assert counts[("/stats/map", "2xx")] == 1 and counts[("other", "4xx")] == 1


def test_client_disconnect_mid_body_is_499_not_5xx(vector_snapshot: Snapshot) -> None:
    app = create_app(ServiceSettings(), _holder(vector_snapshot))
    sent = _raw_call(app, "/assign", [
        {"type": "http.request", "body": b'{"features": [1,', "more_body": True},
        {"type": "http.disconnect"}], content_type="application/json")
    assert sent == []
    counts = _requests(app)
    assert counts.get(("/assign", "4xx")) == 1 and ("/assign", "5xx") not in counts


def test_a_body_that_never_finishes_is_408(vector_snapshot: Snapshot) -> None:
    app = create_app(ServiceSettings(body_timeout=0.2), _holder(vector_snapshot))
    sent = _raw_call(app, "/assign/batch", [
        {"type": "http.request", "body": b'{"items": [', "more_body": True}],
        content_type="application/json")
    assert sent[0]["status"] == 408 and b"0.2 s" in sent[1]["body"]


def test_bad_content_length_is_400(api: Client) -> None:
    scope_app = api.app
    sent: list[dict[str, Any]] = []

    async def go() -> None:
        scope = {
            "type": "http", "method": "POST", "path": "/assign", "headers": [
                (b"content-length", b"abc")], "query_string": b"", "root_path": "",
        }

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await scope_app(scope, receive, send)

    asyncio.run(go())
    assert sent[0]["status"] == 400


def test_no_snapshot_is_503_with_a_reason() -> None:
    api = _client(None)
    for path in ("/assign", "/assign/batch"):
        r = api.post(path, json={"features": [1.0]})
        assert r.status_code == 503 and r.json()["reason"] == "no snapshot loaded yet"
    assert api.get("/model").status_code == 503
    ready = api.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "not ready"
    assert api.get("/healthz").status_code == 200
    stats = api.get("/stats").json()
    assert stats["version"] is None and stats["n_clusters"] == 0


def test_wrong_method_and_unknown_path_are_4xx(api: Client) -> None:
    assert api.get("/assign").status_code == 405
    assert api.post("/nowhere", json={}).status_code == 404


# --------------------------------------------------------------------------- API key
def test_api_key_guards_assign_model_stats_and_metrics(vector_snapshot: Snapshot) -> None:
    api = _client(vector_snapshot, api_key="s3cret")
    payload = {"features": [1, 2, 3, 4, 5]}
    assert api.post("/assign", json=payload).status_code == 401
    assert api.post("/assign", json=payload, headers={"X-API-Key": "nope"}).status_code == 401
    r = api.post("/assign/batch", json={"items": [payload["features"]]})
    assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
    assert api.post("/assign", json=payload, headers={"X-API-Key": "s3cret"}).status_code == 200
    ok = api.post("/assign/batch", json={"items": [payload["features"]]},
                  headers={"x-api-key": "s3cret"})
    assert ok.status_code == 200
    for path in ("/healthz", "/readyz"):
        assert api.get(path).status_code == 200
    for path in ("/metrics", "/stats", "/stats/map", "/model"):
        assert api.get(path).status_code == 401
        assert api.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert api.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert api.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
    doc = api.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    assert doc["paths"]["/assign"]["post"]["security"] == [{"APIKeyHeader": []}]
    assert doc["paths"]["/model"]["get"]["security"] == [{"APIKeyHeader": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]


def test_protection_of_each_read_endpoint_is_configurable(vector_snapshot: Snapshot) -> None:
    api = _client(vector_snapshot, api_key="s3cret", protect_metrics=False, protect_model=False)
    assert api.get("/metrics").status_code == 200 and api.get("/model").status_code == 200
    assert api.get("/stats").status_code == 401 and api.get("/stats/map").status_code == 401
    assert api.post("/assign", json={"features": [1, 2, 3, 4, 5]}).status_code == 401


# --------------------------------------------------------------------------- metrics, stats
SERVICE_METRICS = {
    "oclust_assignments", "oclust_cluster_share", "oclust_hard_entropy_nats",
    "oclust_hard_entropy_ratio", "oclust_kl_star_nats", "oclust_soft_entropy_nats",
    "oclust_drift_js_nats", "oclust_assign_latency_seconds", "oclust_http_requests",
    "oclust_snapshot_version", "oclust_snapshot_age_seconds",
    "oclust_snapshot_created_timestamp_seconds", "oclust_snapshot_fallback", "oclust_build_info",
}


def test_metrics_expose_every_documented_series(vector_snapshot: Snapshot) -> None:
    api = _client(vector_snapshot, window=4)
    x = np.random.default_rng(1).normal(size=(10, 5))
    for row in x[:6]:
        assert api.post("/assign", json={"features": row.tolist()}).status_code == 200
    assert api.post("/assign/batch", json={"items": x[6:].tolist()}).status_code == 200
    assert api.post("/assign", json={"features": []}).status_code == 422
    text = api.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) >= SERVICE_METRICS
    assert "oclust_store_up" not in families  # no store attached to this app
    clusters = {s.labels["cluster"] for s in families["oclust_assignments"].samples}
    assert clusters == {str(k) for k in range(K)}
    total = sum(s.value for s in families["oclust_assignments"].samples
                if s.name == "oclust_assignments_total")
    assert total == 10
    shares = [s.value for s in families["oclust_cluster_share"].samples]
    assert sum(shares) == pytest.approx(1.0)
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value
                for s in families["oclust_http_requests"].samples if s.name.endswith("_total")}
    assert requests[("/assign", "2xx")] == 6 and requests[("/assign", "4xx")] == 1
    assert requests[("/assign/batch", "2xx")] == 1
    latency = families["oclust_assign_latency_seconds"].samples
    counts = {s.labels["endpoint"]: s.value for s in latency if s.name.endswith("_count")}
    assert counts == {"/assign": 6, "/assign/batch": 1}  # same labels as the counter
    version = families["oclust_snapshot_version"].samples[0].value
    assert version == 7
    assert 0 <= families["oclust_snapshot_age_seconds"].samples[0].value < 600
    drift = families["oclust_drift_js_nats"].samples[0].value
    assert 0 <= drift <= math.log(2)  # 10 assignments = more than two windows of 4


def test_stats_agree_with_metrics(vector_snapshot: Snapshot) -> None:
    api = _client(vector_snapshot, window=50)
    x = np.random.default_rng(2).normal(size=(20, 5))
    assert api.post("/assign/batch", json={"items": x.tolist()}).status_code == 200
    s = api.get("/stats").json()
    assert s["version"] == 7 and s["n_clusters"] == K and s["window"] == 50
    assert s["filled"] == s["samples_seen"] == 20 and sum(s["counts"]) == 20
    assert s["drift_js"] is None and s["drift_reference"] == "previous_window"
    assert s["hard_entropy_ratio"] == pytest.approx(s["hard_entropy"] / math.log(K))
    assert 0 <= s["snapshot_age_seconds"] < 600 and s["store_up"] is None
    families = {f.name: f for f in text_string_to_metric_families(api.get("/metrics").text)}
    assert families["oclust_kl_star_nats"].samples[0].value == pytest.approx(s["kl_star"])


def test_stats_map_projects_the_recent_latents(vector_snapshot: Snapshot) -> None:
    api = _client(vector_snapshot, max_batch=1000)
    empty = api.get("/stats/map").json()
    assert empty["points"] == [] and empty["centroids"] == [] and empty["n_clusters"] == K
    x = np.random.default_rng(3).normal(size=(700, 5)).astype("float32")
    for row in x[:5]:
        assert api.post("/assign", json={"features": row.tolist()}).status_code == 200
    got = api.get("/stats/map").json()
    clusters = [api.post("/assign", json={"features": r.tolist()}).json()["cluster"]
                for r in x[:5]]
    assert got["clusters"] == clusters and len(got["points"]) == 5
    answer = api.post("/assign/batch", json={"items": x[5:].tolist()}).json()
    m = api.get("/stats/map").json()
    assert m["version"] == 7 and m["capacity"] == 500 and m["latent_dim"] == 8
    assert len(m["points"]) == len(m["clusters"]) == 500  # bounded: the last 500 points
    assert m["clusters"] == answer["clusters"][-500:]
    assert all(len(p) == 2 for p in m["points"]) and len(m["centroids"]) == K
    # the same projection as a PCA of the latents the model gives for those points
    clf = OnlineClusterer.from_snapshot(vector_snapshot, device="cpu")
    z = clf.transform(x[-500:]).astype(np.float64)
    centred = z - z.mean(axis=0)
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    points = np.array(m["points"])
    for axis in range(2):  # each axis up to its sign
        want = centred @ vt[axis]
        sign = np.sign(want @ points[:, axis])
        np.testing.assert_allclose(points[:, axis], sign * want, atol=2e-3)
    assert m["explained_variance_ratio"] == pytest.approx(
        (sing[:2] ** 2 / (sing**2).sum()).tolist(), abs=1e-3)
    assert m["explained_variance_ratio"][0] >= m["explained_variance_ratio"][1] > 0


# --------------------------------------------------------------------------- OpenAPI
def _undescribed(schema: dict[str, Any]) -> Iterator[str]:
    """Names of a schema's properties that lack a description."""
    for name, prop in schema.get("properties", {}).items():
        if "description" not in prop:
            yield name


def test_openapi_describes_every_field(api: Client) -> None:
    doc = api.get("/openapi.json").json()
    paths = doc["paths"]
    assert {"/assign", "/assign/batch", "/model", "/healthz", "/readyz", "/metrics",
            "/stats", "/stats/map"} <= set(paths)
    components = doc["components"]["schemas"]
    body = paths["/assign"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/AssignRequest"}
    assert set(paths["/assign"]["post"]["responses"]) == {
        "200", "401", "408", "413", "415", "422", "503"}
    batch = paths["/assign/batch"]["post"]
    assert batch["requestBody"]["content"]["application/octet-stream"]["schema"]["format"] == (
        "binary")
    assert "application/octet-stream" in batch["responses"]["200"]["content"]
    assert "X-Oclust-Version" in doc["info"]["description"]
    for name in ("AssignRequest", "AssignBatchRequest", "AssignResponse", "AssignBatchResponse",
                 "ErrorResponse", "NotReadyResponse", "StatsResponse"):
        assert name in components, name
        assert not list(_undescribed(components[name])), name
    assert components["AssignRequest"]["examples"]
    assert "C×T" in components["AssignRequest"]["properties"]["features"]["description"]
    assert api.get("/docs").status_code == 200


# --------------------------------------------------------------------------- fuzzing
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.sampled_from(["features", "items", "x"]) | st.text(max_size=3), inner,
                      max_size=3),
    max_leaves=40,
)
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**40), 2**40))
near_misses = st.one_of(
    st.builds(lambda v: {"features": v}, st.lists(numbers, min_size=0, max_size=7)),
    st.builds(lambda v: {"items": v}, st.lists(st.lists(numbers, max_size=6), max_size=10)),
    st.builds(lambda v: {"features": v}, st.lists(st.lists(numbers, max_size=3), max_size=3)),
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    near_misses.map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, path=st.sampled_from(["/assign", "/assign/batch"]))
def test_malformed_bodies_never_cause_a_server_error(
    api: Client, body: bytes, path: str
) -> None:
    r = api.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (200, 413, 422), (r.status_code, r.text)
    payload = r.json()
    if r.status_code != 200:
        assert payload["detail"]
