"""fastsal.serve's framework-free core: decoding with limits, encodings, the batcher, the service.

No HTTP and no KServe here (tests/test_serve_http.py has those)."""

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from fastsal.jobs.images import Preprocess  # noqa: E402
from fastsal.serve.batcher import Batcher  # noqa: E402
from fastsal.serve.decoding import Limits, ModelInfo, V2Input, b64decode, decode_image, parse_v1, parse_v2  # noqa: E402
from fastsal.serve.encoding import decode_map, encode_map  # noqa: E402
from fastsal.serve.errors import BadRequest, TooLarge, Unavailable  # noqa: E402

PRE = Preprocess((64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
INFO = ModelInfo(PRE, 8, ("disc", "ring", "square", "triangle", "cross", "star", "stripes", "checker"))
LIMITS = Limits(max_body_bytes=2**20, max_pixels=1_000_000, max_instances=8)


def image_bytes(w=64, h=48, fmt="JPEG", seed=0, **save):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **save)
    return buf.getvalue()


def flat_png(w, h) -> bytes:
    """A large image in few bytes (one colour compresses to nothing)."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def body(instances, parameters=None) -> bytes:
    doc = {"instances": instances}
    if parameters is not None:
        doc["parameters"] = parameters
    return json.dumps(doc).encode()


# -- decoding: every bad input gets its own clear 4xx -----------------------------------------------
BAD = [
    ("empty body", lambda: b"", BadRequest, "empty"),
    ("not an image", lambda: b"hello, this is text", BadRequest, "not an image"),
    ("truncated JPEG", lambda: image_bytes(200, 200)[:600], BadRequest, "truncated"),
    ("malformed JSON", lambda: b'{"instances": [', BadRequest, "malformed JSON"),
    ("JSON without instances", lambda: b'{"images": []}', BadRequest, '"instances"'),
    ("empty instances", lambda: body([]), BadRequest, "non-empty"),
    ("bad base64", lambda: body([{"image": {"b64": "abc$%^"}}]), BadRequest, "base64"),
    ("b64 of text", lambda: body([{"image": {"b64": b64(b"not an image")}}]), BadRequest, "instances[0].image.b64"),
    ("unknown encoding", lambda: body([{"image": {"b64": b64(image_bytes())}}], {"encoding": "jpeg"}), BadRequest,
     "unknown encoding 'jpeg'"),
    ("unknown method", lambda: body([{"image": {"b64": b64(image_bytes())}}], {"method": "lrp"}), BadRequest,
     "unknown method 'lrp'"),
    ("unknown parameter", lambda: body([{"image": {"b64": b64(image_bytes())}}], {"encodng": "png"}), BadRequest,
     "unknown parameter"),
    ("target out of range", lambda: body([{"image": {"b64": b64(image_bytes())}, "target": 8}]), BadRequest,
     "out of range"),
    ("negative target", lambda: body([{"image": {"b64": b64(image_bytes())}, "target": -1}]), BadRequest,
     "out of range"),
    ("unknown class name", lambda: body([{"image": {"b64": b64(image_bytes())}, "target": "cat"}]), BadRequest,
     "not a class index or a class name"),
    ("too many pixels", lambda: flat_png(1100, 1000), TooLarge, "pixels"),
    ("too many instances", lambda: body([{"image": {"b64": b64(image_bytes())}}] * 9), TooLarge, "at most 8"),
    ("body too large", lambda: b"\xff" * (2**20 + 1), TooLarge, "bytes"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_a_clear_4xx(case):
    _, make, error, words = case
    with pytest.raises(error) as exc:
        parse_v1(make(), INFO, LIMITS)
    assert 400 <= exc.value.status < 500
    assert words in str(exc.value), str(exc.value)


def test_top_k_over_the_explainers_support_is_refused_with_a_reason():
    doc = body([{"image": {"b64": b64(image_bytes())}}], {"top_k": 3})
    with pytest.raises(BadRequest, match="top_k"):
        parse_v1(doc, INFO, LIMITS)  # INFO.max_top_k is 1
    assert parse_v1(doc, INFO, LIMITS, verb="predict").params.top_k == 3  # predict needs no explainer support


def test_raw_and_json_bodies_decode_to_the_same_tensor():
    data = image_bytes()
    raw = parse_v1(data, INFO, LIMITS)
    js = parse_v1(body([{"image": {"b64": b64(data)}, "target": "ring"}], {"encoding": "f16"}), INFO, LIMITS)
    assert torch.equal(raw.instances[0].tensor, js.instances[0].tensor)
    assert raw.instances[0].tensor.shape == (3, 64, 64) and raw.instances[0].image_size == (64, 48)
    assert js.instances[0].target == 1 and js.params.encoding == "f16"
    q = parse_v1(data, INFO, LIMITS, query="target=3&method=gradient&encoding=f16")
    assert q.instances[0].target == 3 and q.params.method == "gradient" and q.params.encoding == "f16"
    # URL-safe base64 without padding, and a data: URL, are accepted
    assert b64decode("data:image/png;base64," + b64(data), "x") == data
    assert b64decode(base64.urlsafe_b64encode(data).decode().rstrip("="), "x") == data


def test_exif_orientation_is_applied():
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees to be viewed
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    _, size = decode_image(buf.getvalue(), PRE, LIMITS)
    assert size == (40, 80)


def test_v2_inputs():
    good = V2Input("image", "BYTES", [2], [b64(image_bytes(seed=1)), b64(image_bytes(seed=2)).encode()])
    req = parse_v2([good, V2Input("target", "INT64", [2], [3, 4])], {"method": "gradient"}, ["class", "saliency"],
                   INFO, LIMITS)
    assert [i.target for i in req.instances] == [3, 4] and req.params.method == "gradient"
    for inputs, params, outputs, words in [
        ([V2Input("image", "FP32", [1], [1.0])], None, None, "BYTES"),
        ([V2Input("pixels", "BYTES", [1], ["x"])], None, None, "inputs must be 'image'"),
        ([good], None, ["heatmap"], "unknown output"),
        ([good], {"encoding": "png"}, None, "only the parameter 'method'"),
        ([good, V2Input("target", "INT64", [1], [9])], None, None, "2 images"),
        ([V2Input("image", "BYTES", [1], ["%%%"])], None, None, "base64"),
    ]:
        with pytest.raises(BadRequest, match=words):
            parse_v2(inputs, params, outputs, INFO, LIMITS)


# -- encodings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 64), (3, 20, 30)])
def test_encodings_round_trip(shape):
    rng = np.random.default_rng(0)
    m = (rng.random(shape, dtype=np.float32) * 0.37).astype(np.float32)
    png = encode_map(m, "png")
    assert png["shape"] == list(shape) and png["encoding"] == "png"
    back = decode_map(json.loads(json.dumps(png)))
    scale = np.atleast_1d(png["scale"])
    assert back.shape == shape
    assert np.abs(back - m).reshape(-1, *shape[-2:]).max(axis=(1, 2)).max() <= scale.max() / 510 + 1e-7
    f16 = decode_map(json.loads(json.dumps(encode_map(m, "f16"))))
    np.testing.assert_allclose(f16, m, rtol=1e-3, atol=1e-7)
    # values beyond float16's range come back through the scale, not as inf
    big = m * 1e7
    f16b = decode_map(encode_map(big, "f16"))
    assert np.isfinite(f16b).all()
    np.testing.assert_allclose(f16b, big, rtol=2e-3, atol=1e-3 * big.max())
    # an all-zero map is valid and stays zero
    assert not decode_map(encode_map(np.zeros(shape, np.float32), "png")).any()


# -- the batcher --------------------------------------------------------------------------------
def closed_loop(batcher, clients, seconds, key="k"):
    """``clients`` threads each submitting one item at a time for ``seconds``; returns latencies."""
    stop = time.monotonic() + seconds
    latencies, lock = [], threading.Lock()

    def client(i):
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            batcher.arriving(1)
            assert batcher.submit(key, i).result(timeout=10) == ("done", i)
            with lock:
                latencies.append(time.perf_counter() - t0)
            time.sleep(0.002)  # the client's own round trip

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 20)
    return latencies


def sleeper(per_batch):
    def run(worker, key, items):
        time.sleep(per_batch)
        return [("done", i) for i in items]
    return run


def test_batcher_fills_batches_under_a_closed_loop_of_8_clients():
    b = Batcher(sleeper(0.03), max_batch_size=8, max_wait_s=0.2)
    try:
        closed_loop(b, 8, 1.5)
    finally:
        assert b.close(timeout=5)
    sizes = {s: n for (_, s), n in b.batch_sizes.items()}
    items = sum(s * n for s, n in sizes.items())
    # a fixed short wait alternates 7/1; tied to the batch time, nearly every item rides in a full batch
    assert sizes.get(8, 0) * 8 >= 0.8 * items, sizes


def test_a_lone_client_does_not_wait_for_a_batch():
    b = Batcher(sleeper(0.005), max_batch_size=8, max_wait_s=0.5)
    try:
        lat = closed_loop(b, 1, 0.5)
    finally:
        b.close(timeout=5)
    assert len(lat) >= 5 and float(np.median(lat)) < 0.1, lat[:5]


def test_batcher_keeps_kinds_apart_and_order_within_a_batch():
    seen = []

    def run(worker, key, items):
        seen.append((key, list(items)))
        return [(key, i) for i in items]

    b = Batcher(run, max_batch_size=4, max_wait_s=0.05)
    b.arriving(6)
    futs = [b.submit("a" if i % 2 else "b", i) for i in range(6)]
    assert [f.result(timeout=5) for f in futs] == [("a" if i % 2 else "b", i) for i in range(6)]
    b.close(timeout=5)
    for key, items in seen:
        assert all((i % 2 == 1) == (key == "a") for i in items) and items == sorted(items)


def test_batcher_failure_stays_in_its_batch_and_close_drains_then_refuses():
    def run(worker, key, items):
        if key == "bad":
            raise RuntimeError("boom")
        time.sleep(0.01)
        return list(items)

    b = Batcher(run, max_batch_size=2, max_wait_s=0.0)
    b.arriving(5)
    bad = b.submit("bad", 0)
    good = [b.submit("good", i) for i in range(4)]
    assert b.close(timeout=5)
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(timeout=1)
    assert [f.result(timeout=1) for f in good] == [0, 1, 2, 3]  # queued before close: finished
    b.arriving(1)
    with pytest.raises(Unavailable):
        b.submit("good", 9)


# -- the service, in process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def service():
    from fastsal.serve.service import ServeConfig, Service

    s = Service(ServeConfig(threads=1, max_batch_size=8, max_wait_ms=100))
    s.warm_up()
    yield s
    assert s.close(timeout=30)


def synthetic_jpeg(i):
    from fastsal.default_model.synthetic import sample

    img, label, _ = sample(i, "test")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=92)
    return buf.getvalue(), label


def test_service_maps_equal_the_explainer_on_the_same_tensor(service):
    import fastsal
    from fastsal.default_model import build_default_model

    data, label = synthetic_jpeg(0)
    answer = service.v1("explain", body([{"image": {"b64": b64(data)}}], {"encoding": "f16"})).result(timeout=30)
    x = parse_v1(data, service.info, LIMITS).instances[0].tensor[None]
    torch.set_num_threads(1)
    ref = fastsal.Explainer(build_default_model(), method="guided").explain(x)
    got = decode_map(answer["explanations"][0])
    np.testing.assert_allclose(got, ref.maps[0].numpy(), rtol=1e-3, atol=1e-3 * float(ref.maps.max()))
    p = answer["predictions"][0]
    assert p["class"] == int(ref.targets[0]) == p["target"] == label
    assert p["class_name"] == service.info.class_names[label]
    assert p["score"] == pytest.approx(float(ref.logits.softmax(1)[0, label]), rel=1e-4)


def test_service_mixed_targets_in_one_request(service):
    images = [synthetic_jpeg(i)[0] for i in range(3)]
    doc = body([{"image": {"b64": b64(images[0])}, "target": 5}, {"image": {"b64": b64(images[1])}},
                {"image": {"b64": b64(images[2])}, "target": "star"}], {"encoding": "f16"})
    answer = service.v1("explain", doc).result(timeout=30)
    assert [p["target"] for p in answer["predictions"]] == [5, answer["predictions"][1]["class"], 5]
    alone = service.v1("explain", body([{"image": {"b64": b64(images[0])}, "target": 5}], {"encoding": "f16"}))
    np.testing.assert_allclose(decode_map(answer["explanations"][0]),
                               decode_map(alone.result(timeout=30)["explanations"][0]), rtol=2e-3, atol=1e-6)


def test_service_top_k(service):
    """top_k=K: maps (K, H, W) of each image's K best classes, as Explainer(top_k=K) gives them;
    refused with a 400 where this fastsal's Explainer has no top_k."""
    import fastsal
    from fastsal.default_model import build_default_model
    from fastsal.serve.engine import explainer_top_k

    images = [synthetic_jpeg(i)[0] for i in range(2)]
    doc = body([{"image": {"b64": b64(d)}} for d in images], {"encoding": "f16", "top_k": 3})
    future = service.v1("explain", doc)
    if not explainer_top_k():
        with pytest.raises(BadRequest, match="top_k"):
            future.result(timeout=30)
        return
    answer = future.result(timeout=30)
    x = torch.stack([parse_v1(d, service.info, LIMITS).instances[0].tensor for d in images])
    ref = fastsal.Explainer(build_default_model(), method="guided").explain(x, top_k=3)
    for i in range(2):
        assert answer["predictions"][i]["target"] == ref.targets[i].tolist()
        assert answer["explanations"][i]["shape"] == [3, 64, 64]
        np.testing.assert_allclose(decode_map(answer["explanations"][i]), ref.maps[i].numpy(), rtol=2e-3,
                                   atol=1e-3 * float(ref.maps[i].max()))


def test_service_one_bad_request_among_7_good_ones(service):
    good = [synthetic_jpeg(i) for i in range(1, 8)]
    futures = [service.v1("explain", image_bytes(100, 100)[:700])]  # truncated: fails alone, at decoding
    futures += [service.v1("explain", data) for data, _ in good]
    with pytest.raises(BadRequest, match="truncated"):
        futures[0].result(timeout=30)
    answers = [f.result(timeout=30) for f in futures[1:]]
    assert [a["predictions"][0]["class"] for a in answers] == [label for _, label in good]
    assert service.v1("predict", good[0][0]).result(timeout=30)["predictions"][0]["class"] == good[0][1]


def test_the_callers_thread_never_decodes_or_runs_the_model(service, monkeypatch):
    """What keeps an adapter's event loop (and so health checks) free: ``v1`` returns a future at
    once; decoding runs on the pool, the model on the device's worker thread."""
    import fastsal.serve.service as svc

    threads = {}
    parse = svc.parse_v1

    def parse_spy(*args, **kw):
        threads["decode"] = threading.current_thread().name
        return parse(*args, **kw)

    runner = service.runners[0]
    explain = runner.explain

    def slow_explain(*args, **kw):
        threads["model"] = threading.current_thread().name
        time.sleep(0.5)  # a slow batch
        return explain(*args, **kw)

    monkeypatch.setattr(svc, "parse_v1", parse_spy)
    monkeypatch.setattr(runner, "explain", slow_explain)
    t0 = time.perf_counter()
    future = service.v1("explain", synthetic_jpeg(0)[0])
    returned = time.perf_counter() - t0
    assert future.result(timeout=30)["predictions"][0]["class"] == 0
    assert returned < 0.1 and time.perf_counter() - t0 >= 0.5
    me = threading.current_thread().name
    assert threads["decode"].startswith("fastsal-decode") and threads["decode"] != me
    assert threads["model"] == "fastsal-serve-worker-0"


@pytest.mark.gpu
def test_service_on_cuda_pads_batches_and_matches_the_explainer():
    import fastsal
    from fastsal.default_model import build_default_model
    from fastsal.serve.service import ServeConfig, Service

    s = Service(ServeConfig(devices=["cuda"], max_batch_size=8, max_wait_ms=200))
    s.warm_up()
    try:
        assert s.runners[0].sizes == [1, 2, 4, 8]
        data = [synthetic_jpeg(i)[0] for i in range(3)]  # a batch of 3 is padded to 4
        answer = s.v1("explain", body([{"image": {"b64": b64(d)}} for d in data], {"encoding": "f16"})).result(60)
        x = torch.stack([parse_v1(d, s.info, LIMITS).instances[0].tensor for d in data]).cuda()
        ref = fastsal.Explainer(build_default_model().cuda(), method="guided").explain(x)
        for i in range(3):
            got = decode_map(answer["explanations"][i])
            np.testing.assert_allclose(got, ref.maps[i].cpu().numpy(), rtol=2e-3, atol=2e-3 * float(ref.maps.max()))
    finally:
        s.close(timeout=30)
