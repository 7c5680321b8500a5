"""``fastsal serve`` over real HTTP on 127.0.0.1 (KServe's model server in a subprocess).

One server for the file (started once: importing torch and KServe takes a while on 2 cores);
the SIGTERM test stops it, so it is the last test here. Every wait has a timeout.
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("kserve")
pytest.importorskip("PIL")
psutil = pytest.importorskip("psutil")
from PIL import Image  # noqa: E402

from fastsal.serve.decoding import Limits, parse_v1  # noqa: E402
from fastsal.serve.encoding import decode_map  # noqa: E402

NAME = "fastsal"
MAX_PIXELS = 1_000_000
MAX_BODY_MB = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, data=None, headers=None, timeout=60):
    """(status, headers, body bytes); 4xx/5xx are answers, not exceptions."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Server:
    def __init__(self, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "fastsal", "serve", "--port", str(self.port), "--threads", "1",
               "--max-body-mb", str(MAX_BODY_MB), "--max-pixels", str(MAX_PIXELS), "--max-batch-size", "8",
               "--max-wait-ms", "100", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, MALLOC_ARENA_MAX="2"))
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("fastsal serve exited:\n" + "".join(self.lines[-30:]))
            try:
                if http("GET", self.url + "/v2/health/ready", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("fastsal serve was not ready in 180 s:\n" + "".join(self.lines[-30:]))

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def post(self, path, data, headers=None, timeout=60):
        return http("POST", self.url + path, data, headers, timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def jpeg(i, size=None):
    from fastsal.default_model.synthetic import sample

    img, label, _ = sample(i, "test")
    im = Image.fromarray(img)
    if size:
        im = im.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92)
    return buf.getvalue(), label


def b64(data):
    return base64.b64encode(data).decode()


def instances(images, **parameters):
    doc = {"instances": [{"image": {"b64": b64(d)}} for d in images]}
    if parameters:
        doc["parameters"] = parameters
    return json.dumps(doc).encode()


JSON = {"Content-Type": "application/json"}


def reference(images, method="guided"):
    """fastsal.Explainer on the tensors the server's own decoder makes of ``images``."""
    import fastsal
    from fastsal.default_model import build_default_model
    from fastsal.serve.decoding import ModelInfo
    from fastsal.jobs.models import load_model

    pre = load_model(None).preprocess
    info = ModelInfo(pre, 8)
    x = torch.stack([parse_v1(d, info, Limits()).instances[0].tensor for d in images])
    torch.set_num_threads(1)
    return fastsal.Explainer(build_default_model(), method=method).explain(x)


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3 * float(np.abs(want).max()))


def test_model_list_metadata_health(server):
    status, _, body = http("GET", server.url + "/v1/models")
    assert status == 200 and json.loads(body) == {"models": [NAME]}
    status, _, body = http("GET", server.url + f"/v2/models/{NAME}")
    meta = json.loads(body)
    assert status == 200 and meta["name"] == NAME and meta["platform"]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES", "target": "INT64"}
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["saliency"] == [-1, 64, 64]
    for path in ("/", "/v2/health/live", "/v2/health/ready", f"/v1/models/{NAME}", f"/v2/models/{NAME}/ready"):
        assert http("GET", server.url + path)[0] == 200, path
    assert http("GET", server.url + "/v2/models/nope")[0] == 404


def test_explain_maps_equal_the_explainer_on_the_same_decoded_tensor(server):
    images = [jpeg(i)[0] for i in range(2)]
    ref = reference(images)
    # a raw JPEG body (parameters in the query string), and a JSON body
    status, headers, body = server.post(f"/v1/models/{NAME}:explain?encoding=f16", images[0])
    assert status == 200, body
    headers = {k.lower(): v for k, v in headers.items()}
    assert headers["content-type"] == "application/json"
    assert not {"host", "user-agent", "x-fastsal-query"} & set(headers)  # no request header echoed back
    answer = json.loads(body)
    close(decode_map(answer["explanations"][0]), ref.maps[0].numpy())
    p = answer["predictions"][0]
    assert p["class"] == p["target"] == int(ref.targets[0]) and p["class_name"] == "disc"
    assert p["score"] == pytest.approx(float(ref.logits.softmax(1)[0, p["class"]]), rel=1e-3)
    status, _, body = server.post(f"/v1/models/{NAME}:explain", instances(images), JSON)
    assert status == 200, body
    ex = json.loads(body)["explanations"]
    assert [e["encoding"] for e in ex] == ["png", "png"]
    for i in range(2):  # png: 8-bit, within scale / 510 of the map
        assert np.abs(decode_map(ex[i]) - ref.maps[i].numpy()).max() <= ex[i]["scale"] / 510 + 1e-3 * ex[i]["scale"]
    # predict: the classes, no maps
    status, _, body = server.post(f"/v1/models/{NAME}:predict", images[1], {"Content-Type": "image/jpeg"})
    assert status == 200 and json.loads(body)["predictions"][0]["class"] == int(ref.targets[1])
    assert "explanations" not in json.loads(body)


def batch_sizes(server, kind="explain/guided"):
    """{size: batches} from the fastsal_batch_size histogram on /metrics."""
    text = http("GET", server.url + "/metrics")[2].decode()
    cumulative = {}
    for line in text.splitlines():
        if line.startswith("fastsal_batch_size_bucket") and f'kind="{kind}"' in line and 'le="+Inf"' not in line:
            le = float(line.split('le="')[1].split('"')[0])
            cumulative[int(le)] = float(line.rsplit(" ", 1)[1])
    sizes, prev = {}, 0.0
    for s in sorted(cumulative):
        if cumulative[s] - prev:
            sizes[s] = int(cumulative[s] - prev)
        prev = cumulative[s]
    return sizes


def test_batched_answers_equal_single_request_answers(server):
    images = [jpeg(i)[0] for i in range(10, 18)]
    before = batch_sizes(server)
    status, _, body = server.post(f"/v1/models/{NAME}:explain", instances(images, encoding="f16"), JSON)
    assert status == 200, body
    batched = json.loads(body)
    after = batch_sizes(server)
    assert after.get(8, 0) == before.get(8, 0) + 1, (before, after)  # the 8 instances ran as one batch
    for i, data in enumerate(images):
        status, _, body = server.post(f"/v1/models/{NAME}:explain?encoding=f16", data)
        single = json.loads(body)
        assert single["predictions"][0]["class"] == batched["predictions"][i]["class"]
        close(decode_map(batched["explanations"][i]), decode_map(single["explanations"][0]))


def flat_png(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


def bad_cases():
    good = jpeg(3)[0]
    one = lambda **kw: json.dumps({"instances": [{"image": {"b64": b64(good)}, **kw.pop("inst", {})}],  # noqa: E731
                                   "parameters": kw}).encode()
    explain = f"/v1/models/{NAME}:explain"
    return [
        ("empty body", explain, b"", {}, 400, "empty"),
        ("not an image", explain, b"GIF89a but not really", {"Content-Type": "image/gif"}, 400, "image"),
        ("truncated JPEG", explain, jpeg(4, size=256)[0][:1500], {}, 400, "truncated"),
        ("malformed JSON", explain, b'{"instances": [{"image": ', JSON, 400, "malformed JSON"),
        ("malformed base64", explain, b'{"instances": [{"image": {"b64": "@@@"}}]}', JSON, 400, "base64"),
        ("unknown encoding", explain, one(encoding="jpeg"), JSON, 400, "unknown encoding"),
        ("unknown method", explain, one(method="lime"), JSON, 400, "unknown method"),
        ("target out of range", explain, one(inst={"target": 8}), JSON, 400, "out of range"),
        ("target out of range, raw body", explain + "?target=99", good, {}, 400, "out of range"),
        ("too many pixels", explain, flat_png(1200, 1000), {}, 413, "pixels"),
        ("body too large", explain, b"\xff\xd8" + b"\0" * (MAX_BODY_MB * 2**20), {}, 413, "at most"),
        ("unknown model", f"/v1/models/nope:explain", good, {}, 404, "nope"),
        ("V2 image not BYTES", f"/v2/models/{NAME}/infer",
         json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode(),
         JSON, 400, "BYTES"),
    ]


def test_every_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server):
    for name, path, data, headers, status, words in bad_cases():
        got, _, body = server.post(path, data, headers)
        assert got == status, (name, got, body)
        assert words in json.loads(body)["error"], (name, body)
    status, _, body = server.post(f"/v1/models/{NAME}:explain", jpeg(5)[0])
    assert status == 200 and json.loads(body)["predictions"][0]["class"] == jpeg(5)[1]


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    chunks = (b"\0" * 65536 for _ in range(MAX_BODY_MB * 16 + 2))  # no Content-Length: counted as it comes
    try:
        conn.request("POST", f"/v1/models/{NAME}:explain", body=chunks, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and "at most" in json.loads(r.read())["error"]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered 413 and closed while the client was still sending: refused, too
    finally:
        conn.close()
    assert server.post(f"/v1/models/{NAME}:predict", jpeg(7)[0])[0] == 200


def test_one_bad_and_seven_good_requests_at_once(server):
    good = [jpeg(i) for i in range(20, 27)]
    bodies = [jpeg(6, size=256)[0][:2000]] + [d for d, _ in good]
    results = [None] * 8
    barrier = threading.Barrier(8, timeout=30)

    def send(i):
        barrier.wait()
        results[i] = server.post(f"/v1/models/{NAME}:explain", bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0][0] == 400 and "truncated" in json.loads(results[0][2])["error"]
    for (status, _, body), (_, label) in zip(results[1:], good):
        assert status == 200, body
        assert json.loads(body)["predictions"][0]["class"] == label


def split_binary(headers, body):
    """A V2 response with the binary-data extension: its JSON and the raw bytes of each output."""
    n = int({k.lower(): v for k, v in headers.items()}["inference-header-content-length"])
    doc = json.loads(body[:n])
    raw, offset = {}, n
    for out in doc["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw[out["name"]] = body[offset:offset + size]
            offset += size
    return doc, raw


def test_v2_infer(server):
    images = [jpeg(i)[0] for i in range(30, 33)]
    ref = reference(images)
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": [b64(d) for d in images]}]}
    status, _, body = server.post(f"/v2/models/{NAME}/infer", json.dumps(request).encode(), JSON)
    assert status == 200, body
    outs = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert set(outs) == {"class", "score"}
    assert outs["class"]["datatype"] == "INT64" and outs["class"]["data"] == ref.targets.tolist()
    # the saliency output, float16 [N, H, W], comes in the binary-data extension
    request["outputs"] = [{"name": "class"}, {"name": "saliency"}]
    status, headers, body = server.post(f"/v2/models/{NAME}/infer", json.dumps(request).encode(), JSON)
    assert status == 200, body[:300]
    doc, raw = split_binary(headers, body)
    sal = {o["name"]: o for o in doc["outputs"]}["saliency"]
    assert sal["datatype"] == "FP16" and sal["shape"] == [3, 64, 64]
    close(np.frombuffer(raw["saliency"], dtype="<f2").astype(np.float32).reshape(3, 64, 64), ref.maps.numpy())


def test_health_stays_fast_while_8_clients_explain(server):
    data = [jpeg(i, size=128)[0] for i in range(8)]
    stop = threading.Event()
    served = []

    def client(i):
        while not stop.is_set():
            status, _, _ = server.post(f"/v1/models/{NAME}:explain", data[i])
            served.append(status)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # let the load settle
    latencies = []
    for _ in range(100):
        t0 = time.perf_counter()
        assert http("GET", server.url + "/v2/health/ready", timeout=10)[0] == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert served and set(served) == {200} and len(served) >= 8
    p99 = float(np.percentile(latencies, 99))
    assert p99 < 0.2, f"health p99 {p99 * 1000:.0f} ms under load (median {np.median(latencies) * 1000:.1f} ms)"


def test_memory_levels_off_over_a_few_hundred_requests(server):
    proc = psutil.Process(server.proc.pid)
    big = [jpeg(i, size=512)[0] for i in range(4)]  # decoded 512x512 images: a leak of them shows

    def burst(n):
        def worker(k):
            for j in range(n // 4):
                verb = "explain" if j % 2 == 0 else "predict"
                status, _, _ = server.post(f"/v1/models/{NAME}:{verb}?encoding=f16", big[(k + j) % 4])
                assert status == 200

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return proc.memory_info().rss

    burst(80)  # warm: allocator pools, thread stacks
    rss = [burst(80) for _ in range(3)]
    growth = (rss[-1] - rss[0]) / 2**20
    # a leak of one decoded 512x512 RGB image per request would be ~120 MiB over these 160 requests
    assert growth < 24, f"RSS after 160, 240, 320 requests: {[r // 2**20 for r in rss]} MiB"


def test_sigterm_finishes_in_flight_requests_and_exits_0(server):
    """Last in this file: it stops the module's server."""
    proc = psutil.Process(server.proc.pid)
    assert proc.children(recursive=True) == []
    # 6 requests of 32 images each: two dozen batches, still running when SIGTERM comes
    body = instances([jpeg(i, size=256)[0] for i in range(32)])
    results, finished = [], []

    def send(i):
        try:
            results.append(server.post(f"/v1/models/{NAME}:explain", body, JSON, timeout=60)[0])
            finished.append(time.monotonic())
        except OSError:  # connected after the listener closed: refused, not hung
            results.append("refused")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=90)
    assert server.proc.wait(timeout=90) == 0, "".join(server.lines[-20:])
    assert len(results) == 6 and set(results) <= {200, "refused"}, results
    # requests that were in flight at SIGTERM were answered, not dropped
    assert any(t > sent for t in finished), "no request was in flight at SIGTERM: make them longer"
    assert "fastsal serve: stopped" in "".join(server.lines)
