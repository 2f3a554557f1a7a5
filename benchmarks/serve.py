"""Endpoint load benchmark (`make bench-serve`).

An async HTTP load generator (aiohttp, closed loop: each of C workers sends its next request
when the last one is answered) runs at concurrency 1, 8, 32 and 64 for a fixed duration each,
on exported Fashion-MNIST test PNGs, against, in the same run:

- ceilings: a no-op Serve app (constant JSON for the same request body) behind Serve's Python
  proxy and behind its HAProxy ingress (with Serve's default replica settings, and with the
  ones `clfsys serve` uses), and a plain uvicorn no-op app without Ray;
- peers: a plain FastAPI/uvicorn app that calls the model directly (`model(x)`) once per
  request, and the unbatched deployment (max batch size 1);
- clfsys: batched `/predict` under both ingresses, on real photos (hymenoptera JPEGs) with
  decoding in threads and on the event loop, and the Open Inference Protocol (V2: base64 in
  JSON, and the binary tensor extension that tritonclient uses by default) and TF Serving
  routes behind HAProxy.

The protocols of one server (/predict, V2, TF Serving behind HAProxy) are measured on the same
server, level by level in turn. It prints requests/s, p50/p95/p99 latency and errors per level,
then the targets at concurrency 32.
"""


import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
LEVELS = (1, 8, 32, 64)
NOOP = {"label": "T-shirt/top", "label_index": 0, "confidence": 1.0, "top_k": [],
        "model_id": "noop"}


def noop_api():
    from fastapi import FastAPI, Request

    api = FastAPI()

    @api.post("/predict")
    async def predict(request: Request):
        await request.body()
        return NOOP

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return api


def direct_app(bundle_dir: str, port: int) -> None:
    """A single process calling the model directly, once per request."""
    import uvicorn
    from fastapi import FastAPI, Request

    from clfsys.bundle import load
    from clfsys.images import decode

    found = load(bundle_dir)
    model = found.load_model()
    api = FastAPI()

    @api.post("/predict")
    async def predict(request: Request):
        image = decode(await request.body(), found.image_size, found.color_mode)
        probs = np.asarray(model(image[None], training=False))[0]
        index = int(probs.argmax())
        return {"label": found.class_names[index], "label_index": index,
                "confidence": float(probs[index]), "model_id": found.model_id}

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning")


def noop_uvicorn(port: int) -> None:
    import uvicorn

    uvicorn.run(noop_api(), host="127.0.0.1", port=port, log_level="warning")


def noop_serve(port: int, front: str, tuned: bool = False) -> None:
    """The no-op app as a Serve deployment on a local Ray instance behind `front`; `tuned`:
    with the replica settings that clfsys serve uses (no access log, one event loop)."""
    import ray
    from ray import serve

    from clfsys import ingress
    from clfsys.serve import REPLICA_ENV

    run_dir = ingress.make_run_dir()
    ingress.configure_local(front, "127.0.0.1", run_dir)
    ray.init(include_dashboard=False)
    options = {"logging_config": {"enable_access_log": False},
               "ray_actor_options": {"runtime_env": {"env_vars": REPLICA_ENV}}} if tuned else {}
    deployment = serve.deployment(max_ongoing_requests=256, **options)(
        serve.ingress(noop_api())(type("Noop", (), {})))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment.bind(), name="noop", route_prefix="/")

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
        ingress.stop_haproxy(run_dir)


async def load_level(url: str, bodies: list[tuple[bytes, dict]], concurrency: int,
                     seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(session, offset: int):
        nonlocal errors
        i = offset
        while time.perf_counter() < stop_at:
            body, headers = bodies[i % len(bodies)]
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - started)
            i += concurrency

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session, k) for k in range(concurrency)))
        wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "rps": len(latencies) / wall, "errors": errors,
            "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], url: str, log: Path) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    time.sleep(3)  # let HAProxy's reloads and the replicas settle
                    return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    sys.exit(f"server did not start: {' '.join(command)}; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def request_bodies(blobs: list[bytes]) -> dict[str, list[tuple[bytes, dict]]]:
    """The same images as each protocol's request."""
    png = {"Content-Type": "image/png"}
    as_json = {"Content-Type": "application/json"}
    b64 = [base64.b64encode(b).decode() for b in blobs]
    return {
        "own": [(b, png) for b in blobs],
        "v2": [(json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                         "data": [x]}]}).encode(), as_json) for x in b64],
        "tf": [(json.dumps({"instances": [{"b64": x}]}).encode(), as_json) for x in b64],
        "v2-binary": [v2_binary(b) for b in blobs],
    }


def v2_binary(blob: bytes) -> tuple[bytes, dict]:
    """A V2 request with the binary tensor extension, as tritonclient sends it by default."""
    element = len(blob).to_bytes(4, "little") + blob
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(element)}}]}).encode()
    return header + element, {"Content-Type": "application/octet-stream",
                              "Inference-Header-Content-Length": str(len(header))}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("direct", "noop-uvicorn", "noop-serve"):
        mode, rest = sys.argv[1], sys.argv[2:]
        if mode == "direct":
            direct_app(rest[0], int(rest[1]))
        elif mode == "noop-uvicorn":
            noop_uvicorn(int(rest[0]))
        else:
            noop_serve(int(rest[0]), rest[1], tuned=rest[2:] == ["tuned"])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="runs/bench/serve")
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument("--model", help="bundle (default: the seed CNN, trained for 1 epoch)")
    parser.add_argument("--photos", default=str(ROOT.parent / "shared/data/hymenoptera"),
                        help="folder of JPEG photos for the decode-off-the-loop comparison")
    parser.add_argument("--only", help="measure only the variants whose name contains this "
                        "(a quick check; the targets need the whole run)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle_dir = args.model or str(work / "bundle")
    if not args.model and not (work / "bundle" / "metadata.json").exists():
        subprocess.run([sys.executable, "-m", "clfsys.cli", "train", "--config",
                        "jobs/fashion_mnist.yaml", "--set", "train.epochs=1", "--set",
                        "train.tensorboard=false", "--out", bundle_dir, "--force"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    images = work / "images"
    if not images.exists():
        subprocess.run([sys.executable, "-m", "clfsys.cli", "export-images", "--split", "test",
                        "--limit", "500", "--out", str(images)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    bodies = request_bodies([p.read_bytes() for p in sorted(images.rglob("*.png"))])
    photos = sorted(Path(args.photos).rglob("*.jpg"))
    bodies["photos"] = [(p.read_bytes(), {"Content-Type": "image/jpeg"}) for p in photos]
    me = [sys.executable, "benchmarks/serve.py"]
    clfsys = [sys.executable, "-m", "clfsys.cli", "serve", "--model", bundle_dir]
    # name: (command without the port, path, protocol)
    variants = {
        "ceiling: no-op Serve, Serve proxy": (me + ["noop-serve", "{port}", "proxy"],
                                              "/predict", "own"),
        "ceiling: no-op Serve, HAProxy": (me + ["noop-serve", "{port}", "haproxy"],
                                          "/predict", "own"),
        "ceiling: no-op Serve, HAProxy, clfsys's replica settings": (
            me + ["noop-serve", "{port}", "haproxy", "tuned"], "/predict", "own"),
        "ceiling: no-op uvicorn, no Ray": (me + ["noop-uvicorn", "{port}"], "/predict", "own"),
        "peer: FastAPI, model(x) per request": (me + ["direct", bundle_dir, "{port}"],
                                                "/predict", "own"),
        "peer: unbatched deployment, HAProxy": (clfsys + ["--max-batch-size", "1"],
                                                "/predict", "own"),
        "clfsys /predict, Serve proxy": (clfsys + ["--ingress", "proxy"], "/predict", "own"),
        "clfsys /predict, HAProxy": (clfsys + ["--ingress", "haproxy"], "/predict", "own"),
        "clfsys /predict, HAProxy, photos decoded in threads": (
            clfsys + ["--ingress", "haproxy"], "/predict", "photos"),
        "clfsys /predict, HAProxy, photos decoded on the loop": (
            clfsys + ["--ingress", "haproxy", "--decode-threads", "0"], "/predict", "photos"),
        "clfsys V2 infer, HAProxy": (clfsys + ["--ingress", "haproxy"],
                                     "/v2/models/clfsys/infer", "v2"),
        "clfsys V2 infer, binary extension, HAProxy": (clfsys + ["--ingress", "haproxy"],
                                                       "/v2/models/clfsys/infer", "v2-binary"),
        "clfsys TF Serving predict, HAProxy": (clfsys + ["--ingress", "haproxy"],
                                               "/v1/models/clfsys:predict", "tf"),
    }
    if not photos:
        print(f"no JPEG photos under {args.photos}: the photo variants are left out",
              file=sys.stderr)
        variants = {k: v for k, v in variants.items() if v[2] != "photos"}
    if args.only:
        variants = {k: v for k, v in variants.items() if args.only in k}
    # Variants with the same command (the protocols of one server) share one server and are
    # measured level by level in turn, so that they compare under the same conditions.
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, (command, _, _) in variants.items():
        groups.setdefault(tuple(command), []).append(name)
    results: dict[str, dict[int, dict]] = {}
    for command, names in groups.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = list(command)
        if command[:len(clfsys)] == clfsys:
            command = command + ["--port", str(port), "--metrics-port", str(free_port())]
        command = [c.replace("{port}", str(port)) for c in command]
        proc = start(command, url, work / f"server_{port}.log")
        try:
            for name in names:  # warm-up
                _, path, protocol = variants[name]
                asyncio.run(load_level(url + path, bodies[protocol], 8, 3))
            for c in LEVELS:
                for name in names:
                    _, path, protocol = variants[name]
                    results.setdefault(name, {})[c] = asyncio.run(load_level(
                        url + path, bodies[protocol], c, args.seconds))
        finally:
            stop(proc)
        for name in names:
            print(f"measured {name}: {results[name][32]['rps']:.0f} req/s at 32",
                  file=sys.stderr, flush=True)
    results = {name: results[name] for name in variants}
    print(f"\n## Endpoint load: {args.seconds:.0f} s per level, {len(bodies['own'])} "
          "Fashion-MNIST PNGs, 2-core machine (load generator on the same cores)")
    print(f"| {'variant':<50} | conc | req/s  | p50 ms | p95 ms | p99 ms | errors |")
    print(f"|{'-' * 52}|------|--------|--------|--------|--------|--------|")
    for name, levels in results.items():
        for c, r in levels.items():
            print(f"| {name:<50} | {c:>4} | {r['rps']:>6.0f} | {r['p50']:>6.1f} | "
                  f"{r['p95']:>6.1f} | {r['p99']:>6.1f} | {r['errors']:>6} |")
    at = {name: levels[32] for name, levels in results.items()}
    if args.only:
        return
    ours = at["clfsys /predict, HAProxy"]
    ceiling = at["ceiling: no-op Serve, HAProxy"]
    tuned = at["ceiling: no-op Serve, HAProxy, clfsys's replica settings"]
    direct = at["peer: FastAPI, model(x) per request"]
    errors = sum(r["errors"] for levels in results.values() for r in levels.values())
    print(f"\nAt concurrency 32, clfsys /predict behind HAProxy: {ours['rps']:.0f} req/s = "
          f"{ours['rps'] / ceiling['rps']:.2f}x the HAProxy no-op ceiling (target >= 0.7x), "
          f"p99 {ours['p99']:.0f} ms (target <= 50), {ours['rps'] / direct['rps']:.1f}x the "
          f"direct-call app (target >= 3x); errors in the whole run: {errors} (target 0); "
          f"{ours['rps'] / tuned['rps']:.2f}x the no-op with clfsys's replica settings")
    for route in ("clfsys V2 infer, HAProxy", "clfsys V2 infer, binary extension, HAProxy",
                  "clfsys TF Serving predict, HAProxy",
                  "clfsys /predict, Serve proxy"):
        print(f"  {route}: {at[route]['rps']:.0f} req/s = {at[route]['rps'] / ours['rps']:.2f}x "
              f"/predict behind HAProxy, p99 {at[route]['p99']:.0f} ms")
    threads = at.get("clfsys /predict, HAProxy, photos decoded in threads")
    loop = at.get("clfsys /predict, HAProxy, photos decoded on the loop")
    if threads and loop:
        print(f"  photos ({len(bodies['photos'])} JPEGs): decoded in threads {threads['rps']:.0f} "
              f"req/s, p99 {threads['p99']:.0f} ms; on the event loop {loop['rps']:.0f} req/s, "
              f"p99 {loop['p99']:.0f} ms")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
