"""Endpoint load benchmark (`make bench-serve`).

An async HTTP load generator (aiohttp, closed loop: each of C workers sends its next request
when the last one is answered) runs at concurrency 1, 8, 32 and 64 for a fixed duration each,
on exported Fashion-MNIST test PNGs, against, in the same run:

- ceilings: a no-op Serve app (constant JSON for the same request body) behind Serve's Python
  proxy and behind its HAProxy ingress (with Serve's default replica settings, and with the
  ones `clfsys serve` uses), and a plain uvicorn no-op app without Ray;
- peers: a plain FastAPI/uvicorn app that calls the model directly (`model(x)`) once per
  request, the unbatched deployment (max batch size 1), and (with --bentoml-python, as
  `make bench-serve` runs it) BentoML serving the same model.keras with adaptive batching at
  clfsys's batch size (benchmarks/bentoml_service.py, in its own environment);
- clfsys: batched `/predict` under both ingresses, as multipart uploads (how BentoML takes
  the same PNGs) behind HAProxy, on real photos (hymenoptera JPEGs) with
  decoding in threads and on the event loop, and the Open Inference Protocol (V2: base64 in
  JSON, and the binary tensor extension that tritonclient uses by default) and TF Serving
  routes behind HAProxy.

Everything behind one ingress runs on one Ray instance, as one cluster serves several models:
the HAProxy no-ops, clfsys's default app (/predict, V2, TF Serving, photos), the unbatched
deployment and a clfsys app that decodes on the loop are applications of the same Serve
instance behind the same HAProxy. Each level is measured in rounds (`--rounds`, of `--seconds`
each), every round visiting every variant of that instance in turn, the order rotating. So a
ratio (clfsys / no-op, V2 / /predict) compares measurements taken seconds apart under the same
conditions; it is reported per round, as the median and range over the rounds. The table gives
medians, and the range of requests/s over the rounds, since on a small shared machine one
window can be a third off another.

Each window also records the server's CPU time per request: all the machine's busy CPU time
(/proc/stat) during the window, less the load generator's own, over the requests answered. It
shows where a variant's cost lies (Serve's proxy against HAProxy, a route's parsing); it moves
with throughput too, since a larger batch and the Ray instance's fixed background work are
shared by more requests.

A whole run ends with the inference routes' cost in-process (`--only in-process` runs just that):
clfsys's app with the real model, driven through ASGI one request at a time, without sockets or
Ray, so that what the routes themselves add to a request is measured apart from the load test's
noise.
"""


import argparse
import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from clfsys.ingress import free_port

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
LEVELS = (1, 8, 32, 64)
BENTOML = "peer: BentoML, adaptive batching (max batch 32), multipart upload"
UPLOAD = "clfsys /predict, HAProxy, multipart upload"
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


def noop_serve(name: str, tuned: bool = False) -> None:
    """The no-op app as Serve application `name` at /`name`, on the Ray instance in RAY_ADDRESS
    (the one a `clfsys serve` of the same run started); `tuned`: with the replica settings that
    clfsys serve uses (no access log, one event loop). No CPU is reserved for it, so that it
    fits beside the clfsys replicas; that is bookkeeping, not a limit."""
    import ray
    from ray import serve

    from clfsys.serve import replica_env

    ray.init()
    options: dict = {"ray_actor_options": {"num_cpus": 0}}
    if tuned:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": replica_env()}
        options["logging_config"] = {"enable_access_log": False}
    deployment = serve.deployment(max_ongoing_requests=256, **options)(
        serve.ingress(noop_api())(type("Noop", (), {})))
    serve.run(deployment.bind(), name=name, route_prefix=f"/{name}")

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(name)


def machine_busy_s() -> float:
    """Busy CPU seconds of all cores since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


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
        started, busy, own = time.perf_counter(), machine_busy_s(), time.process_time()
        await asyncio.gather(*(worker(session, k) for k in range(concurrency)))
        wall = time.perf_counter() - started
        server_cpu = machine_busy_s() - busy - (time.process_time() - own)
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "rps": len(latencies) / wall, "errors": errors,
            "cpu_us": max(server_cpu, 0.0) / max(len(latencies), 1) * 1e6,
            "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99))}


def start(command: list[str], url: str, log: Path, env: dict | None = None
          ) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), start_new_session=True, env=env)
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
        "form": [form_upload(b, "file") for b in blobs],  # clfsys's multipart field
        "bentoml-form": [form_upload(b, "images") for b in blobs],  # BentoML's: the argument
    }


def form_upload(blob: bytes, field: str) -> tuple[bytes, dict]:
    """The PNG as a multipart/form-data upload in `field`, as `curl -F field=@x.png` sends it."""
    boundary = "clfsys-bench-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="x.png"\r\nContent-Type: image/png\r\n\r\n').encode() + blob + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def v2_binary(blob: bytes) -> tuple[bytes, dict]:
    """A V2 request with the binary tensor extension, as tritonclient sends it by default."""
    element = len(blob).to_bytes(4, "little") + blob
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(element)}}]}).encode()
    return header + element, {"Content-Type": "application/octet-stream",
                              "Inference-Header-Content-Length": str(len(header))}


INFERENCE_ROUTES = {"/predict": ("/predict", "own"), "V2 infer": ("/v2/models/clfsys/infer", "v2"),
                    "V2 infer, binary extension": ("/v2/models/clfsys/infer", "v2-binary"),
                    "TF Serving predict": ("/v1/models/clfsys:predict", "tf")}


def in_process(bundle_dir: str, bodies: dict, requests: int = 2000,
               rounds: int = 5) -> dict[str, list[float]]:
    """Microseconds a request on each inference route of clfsys's app run in this process
    (clfsys.http.call_asgi: no sockets, no Ray) with the real Predictor, one request at a time;
    `rounds` rounds, each visiting every route in turn, the order rotating. The routes differ
    only in parsing and answering, which a load test can hide under its noise."""
    from clfsys.http import DirectBackend, Limits, build_api, call_asgi
    from clfsys.predict import Predictor

    app = build_api(DirectBackend(Predictor(bundle_dir)), Limits(10 << 20))

    def asgi_request(path: str, body: bytes, headers: dict) -> dict:
        headers = {**headers, "Content-Length": str(len(body))}
        return {"method": "POST", "path": path, "query_string": b"", "body": body,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}

    async def run(count: int, path: str, protocol: str) -> float:
        batch = [asgi_request(path, body, headers) for body, headers in bodies[protocol]]
        started = time.perf_counter()
        for i in range(count):
            answer = await call_asgi(app, batch[i % len(batch)])
            if answer.status != 200:
                raise SystemExit(f"{path} answered {answer.status}: {answer.body[:200]!r}")
        return (time.perf_counter() - started) / count * 1e6

    async def measure() -> dict[str, list[float]]:
        names = list(INFERENCE_ROUTES)
        for path, protocol in INFERENCE_ROUTES.values():  # warm-up
            await run(200, path, protocol)
        out: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                out[name].append(await run(requests, *INFERENCE_ROUTES[name]))
        return out

    return asyncio.run(measure())


def print_in_process(costs: dict[str, list[float]]) -> None:
    base = costs["/predict"]
    print(f"\n## In-process cost of each inference route (call_asgi, the real model, one request "
          f"at a time; median and range over {len(base)} rounds)")
    print("| route                      | us a request | range       | x /predict (range)  |")
    print("|----------------------------|--------------|-------------|---------------------|")
    for name, us in costs.items():
        ratios = [x / y for x, y in zip(us, base, strict=True)]
        print(f"| {name:<26} | {median(us):>12.0f} | {min(us):>5.0f}-{max(us):<5.0f} | "
              f"{median(ratios):>5.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")


def median(values: list[float]) -> float:
    return float(np.median(values))


def summarize(rounds: list[dict]) -> dict:
    """One variant at one level over the rounds: medians, the requests/s range, all errors."""
    rps = [r["rps"] for r in rounds]
    return {"rps": median(rps), "rps_min": min(rps), "rps_max": max(rps),
            **{q: median([r[q] for r in rounds]) for q in ("p50", "p95", "p99", "cpu_us")},
            "errors": sum(r["errors"] for r in rounds), "rounds": rounds}


def paired(results: dict, name: str, base: str, level: int = 32,
           key: str = "rps") -> tuple[float, float, float]:
    """Median, min and max over the rounds of name's `key` (requests/s, or server CPU per
    request) over base's in the same round."""
    ratios = [x[key] / y[key] for x, y in zip(results[name][level]["rounds"],
                                              results[base][level]["rounds"], strict=True)]
    return median(ratios), min(ratios), max(ratios)


def route_ratios(results: dict, ours: str, level: int) -> None:
    """Each standard protocol route against /predict of the same server, within the rounds."""
    for route in ("clfsys V2 infer, HAProxy", "clfsys V2 infer, binary extension, HAProxy",
                  "clfsys TF Serving predict, HAProxy"):
        if route not in results:
            continue
        at, base = results[route][level], results[ours][level]
        ratio = paired(results, route, ours, level)
        cpu = paired(results, route, ours, level, key="cpu_us")
        print(f"  {route}: {at['rps']:.0f} req/s = {ratio[0]:.2f}x /predict "
              f"({ratio[1]:.2f}-{ratio[2]:.2f}; target within 10%), p99 {at['p99']:.0f} ms; "
              f"server CPU {at['cpu_us']:.0f} us a request = {cpu[0]:.2f}x /predict's "
              f"{base['cpu_us']:.0f} ({cpu[1]:.2f}-{cpu[2]:.2f})")


def against_bentoml(results: dict) -> None:
    """clfsys /predict behind HAProxy against BentoML, the same multipart uploads, level by
    level (each measured in its own rounds: the two cannot share a server)."""
    if BENTOML not in results or UPLOAD not in results:
        return
    ours = UPLOAD
    print("\nclfsys /predict behind HAProxy against BentoML, both sent the PNGs as multipart "
          "uploads (targets at concurrency 32: >= 1.5x its req/s, a p99 no higher than its):")
    for c in sorted(set(results[ours]) & set(results[BENTOML])):
        us, them = results[ours][c], results[BENTOML][c]
        print(f"  concurrency {c:>2}: {us['rps']:.0f} vs {them['rps']:.0f} req/s "
              f"({us['rps'] / them['rps']:.2f}x), p50 {us['p50']:.1f} vs {them['p50']:.1f} ms, "
              f"p99 {us['p99']:.1f} vs {them['p99']:.1f} ms")


def ray_address(log: Path) -> str:
    """The address of the Ray instance a `clfsys serve` started, from its "serving" line."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"Ray at ([0-9.]+:\d+)", log.read_text())
        if found:
            return found.group(1)
        time.sleep(0.5)
    sys.exit(f"no Ray address in {log}")


def measure_group(servers: list[tuple[list[str], str]], names: list[str], variants: dict,
                  bodies: dict, args, work: Path) -> dict[str, dict[int, list[dict]]]:
    """Start the group's servers (the first starts the Ray instance, the others join it), then
    for each level, round after round, measure every variant in turn (the order rotates)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    procs: list[subprocess.Popen] = []
    results: dict[str, dict[int, list[dict]]] = {name: {} for name in names}
    try:
        for i, (command, prefix) in enumerate(servers):
            command = [c.replace("{port}", str(port)) for c in command]
            if "clfsys.cli" in command:
                command += ["--port", str(port)]
                if i == 0:
                    command += ["--metrics-port", str(free_port())]
            log = work / f"server_{port}_{i}.log"
            procs.append(start(command, url + prefix, log, env))
            if i == 0 and len(servers) > 1:
                env = {**env, "RAY_ADDRESS": ray_address(log), "RAY_AUTH_MODE": "token"}
        for name in names:  # warm-up
            _, path, protocol = variants[name]
            asyncio.run(load_level(url + path, bodies[protocol], 8, 3))
        for c in args.levels:
            for r in range(args.rounds):
                turn = r % len(names)
                for name in names[turn:] + names[:turn]:
                    _, path, protocol = variants[name]
                    results[name].setdefault(c, []).append(asyncio.run(load_level(
                        url + path, bodies[protocol], c, args.seconds)))
    finally:
        for proc in reversed(procs):
            stop(proc)
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("direct", "noop-uvicorn", "noop-serve"):
        mode, rest = sys.argv[1], sys.argv[2:]
        if mode == "direct":
            direct_app(rest[0], int(rest[1]))
        elif mode == "noop-uvicorn":
            noop_uvicorn(int(rest[0]))
        else:
            noop_serve(rest[0], tuned=rest[1:] == ["tuned"])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="runs/bench/serve")
    parser.add_argument("--seconds", type=float, default=5.0, help="per level and round")
    parser.add_argument("--levels", default=LEVELS, help="concurrency levels, e.g. 32 or 8,32",
                        type=lambda text: tuple(int(c) for c in text.split(",")))
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements of each variant at each level, interleaved")
    parser.add_argument("--model", help="bundle (default: the seed CNN, trained for 1 epoch)")
    parser.add_argument("--photos", default=str(ROOT.parent / "shared/data/hymenoptera"),
                        help="folder of JPEG photos for the decode-off-the-loop comparison")
    parser.add_argument("--bentoml-python", help="the BentoML environment's python (make "
                        "bench-serve makes runs/bench/bentoml-env); without it, no BentoML")
    parser.add_argument("--only", help="measure only the variants whose name matches this "
                        "regular expression (a quick check; the targets need the whole run); "
                        "'in-process': only the inference routes' cost without HTTP, which a "
                        "whole run ends with")
    args = parser.parse_args()
    if not args.only and 32 not in args.levels:
        parser.error("a whole run checks the targets at concurrency 32: keep 32 in --levels")
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
    photos = sorted(p for p in Path(args.photos).rglob("*") if p.suffix.lower() in
                    (".jpg", ".jpeg"))
    bodies["photos"] = [(p.read_bytes(), {"Content-Type": "image/jpeg"}) for p in photos]
    me = [sys.executable, "benchmarks/serve.py"]
    clfsys = [sys.executable, "-m", "clfsys.cli", "serve", "--model", bundle_dir]
    # Each group is one Ray instance (or one plain process) with its servers: the first starts
    # it, the others add their application to it. (command, URL prefix of its /healthz)
    groups = {
        "haproxy": [(clfsys + ["--ingress", "haproxy"], ""),
                    (me + ["noop-serve", "noop"], "/noop"),
                    (me + ["noop-serve", "tuned", "tuned"], "/tuned"),
                    # (half a CPU each, so that the three clfsys replicas fit on 2 CPUs)
                    (clfsys + ["--name", "unbatched", "--max-batch-size", "1", "--num-cpus",
                               "0.5"], "/unbatched"),
                    (clfsys + ["--name", "loop", "--decode-threads", "0", "--num-cpus", "0.5"],
                     "/loop")],
        "proxy": [(clfsys + ["--ingress", "proxy"], ""), (me + ["noop-serve", "noop"], "/noop")],
        "uvicorn": [(me + ["noop-uvicorn", "{port}"], "")],
        "direct": [(me + ["direct", bundle_dir, "{port}"], "")],
    }
    if args.bentoml_python:  # the same bundle and largest batch as clfsys's default
        os.environ.update(CLFSYS_BENCH_BUNDLE=str(Path(bundle_dir).resolve()),
                          CLFSYS_BENCH_MAX_BATCH="32")
        groups["bentoml"] = [([args.bentoml_python, "-m", "bentoml", "serve",
                               "bentoml_service:Classifier", "--working-dir", "benchmarks",
                               "--host", "127.0.0.1", "--port", "{port}"], "")]
    # name: (group, path, protocol)
    variants = {
        "ceiling: no-op Serve, Serve proxy": ("proxy", "/noop/predict", "own"),
        "ceiling: no-op Serve, HAProxy": ("haproxy", "/noop/predict", "own"),
        "ceiling: no-op Serve, HAProxy, clfsys's replica settings": (
            "haproxy", "/tuned/predict", "own"),
        "ceiling: no-op uvicorn, no Ray": ("uvicorn", "/predict", "own"),
        "peer: FastAPI, model(x) per request": ("direct", "/predict", "own"),
        "peer: unbatched deployment, HAProxy": ("haproxy", "/unbatched/predict", "own"),
        BENTOML: ("bentoml", "/predict", "bentoml-form"),
        "clfsys /predict, Serve proxy": ("proxy", "/predict", "own"),
        "clfsys /predict, HAProxy": ("haproxy", "/predict", "own"),
        UPLOAD: ("haproxy", "/predict", "form"),
        "clfsys /predict, HAProxy, photos decoded in threads": ("haproxy", "/predict", "photos"),
        "clfsys /predict, HAProxy, photos decoded on the loop": (
            "haproxy", "/loop/predict", "photos"),
        "clfsys V2 infer, HAProxy": ("haproxy", "/v2/models/clfsys/infer", "v2"),
        "clfsys V2 infer, binary extension, HAProxy": (
            "haproxy", "/v2/models/clfsys/infer", "v2-binary"),
        "clfsys TF Serving predict, HAProxy": ("haproxy", "/v1/models/clfsys:predict", "tf"),
    }
    if not args.bentoml_python:
        del variants[BENTOML]
    if not photos:
        print(f"no JPEG photos under {args.photos}: the photo variants are left out",
              file=sys.stderr)
        variants = {k: v for k, v in variants.items() if v[2] != "photos"}
    if args.only == "in-process":
        print_in_process(in_process(bundle_dir, bodies))
        return
    if args.only:
        variants = {k: v for k, v in variants.items() if re.search(args.only, k)}
    raw: dict[str, dict[int, list[dict]]] = {}
    for group, servers in groups.items():
        names = [name for name, v in variants.items() if v[0] == group]
        if names:
            raw.update(measure_group(servers, names, variants, bodies, args, work))
            shown = 32 if 32 in args.levels else args.levels[-1]
            for name in names:
                rps = sorted(round(r["rps"]) for r in raw[name][shown])
                print(f"measured {name}: {rps} req/s at {shown}", file=sys.stderr, flush=True)
    results = {name: {c: summarize(rounds) for c, rounds in raw[name].items()}
               for name in variants}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n## Endpoint load: {args.rounds} rounds of {args.seconds:.0f} s per level, "
          "interleaved with the other variants on the same Ray instance; medians, and the "
          "range of req/s over the rounds. 2-core machine, load generator on the same cores. "
          f"{len(bodies['own'])} Fashion-MNIST PNGs; photos: {len(bodies['photos'])} JPEGs")
    print(f"| {'variant':<56} | conc | req/s  | range       | p50 ms | p95 ms | p99 ms | errors "
          "| server CPU us/req |")
    print(f"|{'-' * 58}|------|--------|-------------|--------|--------|--------|--------|"
          "-------------------|")
    for name, levels in results.items():
        for c, r in levels.items():
            span = f"{r['rps_min']:.0f}-{r['rps_max']:.0f}"
            print(f"| {name:<56} | {c:>4} | {r['rps']:>6.0f} | {span:>11} | {r['p50']:>6.1f} | "
                  f"{r['p95']:>6.1f} | {r['p99']:>6.1f} | {r['errors']:>6} | "
                  f"{r['cpu_us']:>17.0f} |")
    ours, ceiling = "clfsys /predict, HAProxy", "ceiling: no-op Serve, HAProxy"
    against_bentoml(results)
    if args.only:
        if ours in results:
            for c in args.levels:
                print(f"\nAt concurrency {c}:")
                route_ratios(results, ours, c)
        return
    at = {name: levels[32] for name, levels in results.items()}
    errors = sum(r["errors"] for levels in results.values() for r in levels.values())
    print("\nAt concurrency 32 (ratios: median and range over the rounds, of two variants "
          "measured within the same round, under a minute apart):")
    ratio = paired(results, ours, ceiling)
    print(f"  clfsys /predict behind HAProxy: {at[ours]['rps']:.0f} req/s = {ratio[0]:.2f}x the "
          f"HAProxy no-op ceiling ({ratio[1]:.2f}-{ratio[2]:.2f}; target >= 0.7x), p99 "
          f"{at[ours]['p99']:.0f} ms (target <= 50), "
          f"{at[ours]['rps'] / at['peer: FastAPI, model(x) per request']['rps']:.1f}x the "
          f"direct-call app (target >= 3x); errors in the whole run: {errors} (target 0)")
    tuned = paired(results, ours, "ceiling: no-op Serve, HAProxy, clfsys's replica settings")
    print(f"  {tuned[0]:.2f}x the no-op with clfsys's replica settings "
          f"({tuned[1]:.2f}-{tuned[2]:.2f})")
    route_ratios(results, ours, 32)
    proxy = "clfsys /predict, Serve proxy"
    print(f"  {proxy}: {at[proxy]['rps']:.0f} req/s, "
          f"{at[proxy]['rps'] / at[ours]['rps']:.2f}x /predict behind HAProxy")
    threads = "clfsys /predict, HAProxy, photos decoded in threads"
    loop = "clfsys /predict, HAProxy, photos decoded on the loop"
    if threads in at and loop in at:
        ratio = paired(results, threads, loop)
        print(f"  photos ({len(bodies['photos'])} JPEGs): decoded in threads "
              f"{at[threads]['rps']:.0f} req/s, p99 {at[threads]['p99']:.0f} ms; on the event "
              f"loop {at[loop]['rps']:.0f} req/s, p99 {at[loop]['p99']:.0f} ms; threads/loop "
              f"{ratio[0]:.2f}x ({ratio[1]:.2f}-{ratio[2]:.2f})")
    print_in_process(in_process(bundle_dir, bodies))


if __name__ == "__main__":
    main()
