"""``fastsal serve`` under load on loopback: fastsal's maps vs a Captum-backed server.

Two servers of the same code and model run side by side, one explaining with
``fastsal.Explainer`` and one with Captum's ``GuidedBackprop`` (``--explainer captum``:
a forward for the predicted class, then Captum's attribution, as servers built on Captum
do it). For each number of concurrent clients and each verb, the two servers are measured in
alternating slices (fastsal, captum, fastsal, captum, ...): p50/p99 latency, requests/s and the batch
sizes the server ran (its ``fastsal_batch_size`` histogram on ``/metrics``). A last cell
mixes one bad request (a truncated JPEG) into every eight and counts good requests that failed.

    python benchmarks/bench_serve.py                        # embedded model, 1/8/32 clients, ~4 min
    python benchmarks/bench_serve.py --model resnet18 --weights random --seconds 20

Rows go to benchmarks/results/serve-<device>-<model>.csv with CPU, versions, date and the
load average (the machine may be shared: read the figures with it).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import http.client
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
from fastsal._machine import cpu_name

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



class Server:
    def __init__(self, args, explainer: str):
        self.port = free_port()
        cmd = [sys.executable, "-m", "fastsal", "serve", "--port", str(self.port), "--explainer", explainer,
               "--max-batch-size", str(args.max_batch_size), "--device", args.device, "--name", "m"]
        for flag, value in (("--model", args.model), ("--weights", args.weights), ("--threads", args.threads),
                            ("--max-wait-ms", args.max_wait_ms)):
            if value is not None:
                cmd += [flag, str(value)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        threading.Thread(target=lambda: [self.lines.append(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.lines[-20:]))
            try:
                if self.get("/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server not ready in 300 s")

    def get(self, path):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def batch_sizes(self, kind):
        text = self.get("/metrics")[1].decode()
        cumulative = {}
        for line in text.splitlines():
            if line.startswith("fastsal_batch_size_bucket") and f'kind="{kind}"' in line and "+Inf" not in line:
                cumulative[int(float(line.split('le="')[1].split('"')[0]))] = float(line.rsplit(" ", 1)[1])
        out, prev = {}, 0.0
        for s in sorted(cumulative):
            out[s], prev = cumulative[s] - prev, cumulative[s]
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def load(port, path, bodies, clients, seconds, max_requests, bad=None):
    """``clients`` closed-loop clients (keep-alive connections) for ``seconds`` or ``max_requests``.
    ``bad``: a body sent as every 8th request (its answers are counted apart)."""
    stop_at = time.monotonic() + seconds
    lat, good_fail, bad_status, lock = [], [0], [], threading.Lock()
    count = [0]

    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        j = 0
        while time.monotonic() < stop_at:
            with lock:
                if count[0] >= max_requests:
                    break
                count[0] += 1
                is_bad = bad is not None and count[0] % 8 == 0
            body = bad if is_bad else bodies[(k + j) % len(bodies)]
            j += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "image/jpeg"})
                r = conn.getresponse()
                r.read()
                status = r.status
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                status = -1
            dt_ = time.perf_counter() - t0
            with lock:
                if is_bad:
                    bad_status.append(status)
                elif status == 200:
                    lat.append(dt_)
                else:
                    good_fail[0] += 1
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 300)
    wall = time.perf_counter() - t0
    return lat, good_fail[0], bad_status, wall


def jpegs(n, size):
    from PIL import Image

    from fastsal.default_model.synthetic import sample

    out = []
    for i in range(n):
        img, _, _ = sample(i, "test")
        im = Image.fromarray(img).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each server")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=8.0, help="per cell, at most")
    p.add_argument("--max-requests", type=int, default=600, help="per cell, at most")
    p.add_argument("--rounds", type=int, default=3, help="slices per cell, the servers alternating")
    p.add_argument("--image-size", type=int, default=224, help="side of the JPEGs sent (resized by the server)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    import fastsal

    tag = f"{'cuda' if args.device.startswith('cuda') else 'cpu'}-{(args.model or 'default').replace(':', '_')}"
    out = args.out or os.path.join(HERE, "results", f"serve-{tag}.csv")
    bodies = jpegs(16, args.image_size)
    bad = bodies[0][: len(bodies[0]) // 3]
    stamp = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "cpu": cpu_name(),
             "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "fastsal": fastsal.__version__}
    try:
        from importlib.metadata import version

        stamp["kserve"] = version("kserve")
        stamp["captum"] = version("captum")
    except Exception:  # noqa: BLE001
        pass
    servers = {}
    rows = []
    try:
        for name in ("fastsal", "captum"):
            servers[name] = Server(args, name)
            print(servers[name].lines[0].strip() if servers[name].lines else name, flush=True)
        # each cell is measured in --rounds slices, the two servers alternating (A B A B ...), so a
        # change of the machine's load during the run falls on both alike
        for c in args.concurrency:
            for verb in ("predict", "explain"):
                kind = "predict" if verb == "predict" else "explain/guided"
                acc = {name: {"lat": [], "fails": 0, "wall": 0.0, "load": [], "sizes": {}} for name in servers}
                for name, srv in servers.items():
                    load(srv.port, f"/v1/models/m:{verb}", bodies, c, 1.5, 4 * c)  # warm: connections, allocator
                for _ in range(args.rounds):
                    for name, srv in servers.items():
                        a = acc[name]
                        before = srv.batch_sizes(kind)
                        a["load"].append(os.getloadavg()[0])
                        lat, fails, _, wall = load(srv.port, f"/v1/models/m:{verb}", bodies, c,
                                                   args.seconds / args.rounds, args.max_requests // args.rounds)
                        after = srv.batch_sizes(kind)
                        for size in after:
                            a["sizes"][size] = a["sizes"].get(size, 0) + int(after[size] - before.get(size, 0))
                        a["lat"] += lat
                        a["fails"] += fails
                        a["wall"] += wall
                for name, a in acc.items():
                    ms = np.array(a["lat"]) * 1e3
                    sizes = {k: v for k, v in sorted(a["sizes"].items()) if v}
                    row = dict(stamp, explainer=name, model=args.model or "default", device=args.device, verb=verb,
                               concurrency=c, requests=len(ms), failed=a["fails"],
                               p50_ms=round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
                               p99_ms=round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
                               rps=round(len(ms) / a["wall"], 2),
                               batch_sizes=" ".join(f"{k}:{v}" for k, v in sizes.items()),
                               load_avg_1m=round(float(np.mean(a["load"])), 2), image_size=args.image_size,
                               max_batch_size=args.max_batch_size)
                    rows.append(row)
                    print(f"{name:8s} {verb:8s} c={c:<3d} {row['requests']:4d} req  p50 {row['p50_ms']} ms  p99 "
                          f"{row['p99_ms']} ms  {row['rps']} req/s  batches {row['batch_sizes']}  failed "
                          f"{row['failed']}  load {row['load_avg_1m']}", flush=True)
        # the bad-input mix: one truncated JPEG in every 8 requests, 8 clients
        srv = servers["fastsal"]
        lat, fails, bad_status, wall = load(srv.port, "/v1/models/m:explain", bodies, 8, args.seconds,
                                            args.max_requests, bad=bad)
        ms = np.array(lat) * 1e3
        rows.append(dict(stamp, explainer="fastsal", model=args.model or "default", device=args.device,
                         verb="explain+bad", concurrency=8, requests=len(lat), failed=fails,
                         p50_ms=round(float(np.percentile(ms, 50)), 2), p99_ms=round(float(np.percentile(ms, 99)), 2),
                         rps=round(len(lat) / wall, 2), batch_sizes=f"bad answered {sorted(set(bad_status))} "
                         f"x{len(bad_status)}", load_avg_1m=round(os.getloadavg()[0], 2),
                         image_size=args.image_size, max_batch_size=args.max_batch_size))
        print(f"bad-input mix: {len(lat)} good answered, {fails} good failed, {len(bad_status)} bad answered "
              f"{sorted(set(bad_status))}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {out}\n\ntargets:")
    get = {(r["explainer"], r["verb"], r["concurrency"]): r for r in rows}
    for c in args.concurrency:
        f, k = get.get(("fastsal", "explain", c)), get.get(("captum", "explain", c))
        if f and k and k["rps"]:
            print(f"  c={c}: explain throughput fastsal/captum = {f['rps'] / k['rps']:.2f}x (target >= 1.5x on CPU)")
    f1, p1 = get.get(("fastsal", "explain", 1)), get.get(("fastsal", "predict", 1))
    if f1 and p1 and p1["p50_ms"]:
        print(f"  c=1: explain p50 / predict p50 = {f1['p50_ms'] / p1['p50_ms']:.2f}x (target <= 2.5x)")
    print(f"  bad-input mix: {rows[-1]['failed']} good requests failed (target 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
