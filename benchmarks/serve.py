"""Endpoint load benchmark (`make bench-serve`).

An async HTTP load generator (aiohttp, closed loop: each of C workers sends its next request
when the last one is answered) runs at concurrency 1, 8, 32 and 64 for a fixed duration each
against, in the same run:
  - the batched Ray Serve deployment (`clfsys serve`, max batch 32),
  - the same deployment with batching off (max batch size 1),
  - a plain single-process FastAPI/uvicorn app calling model.predict once per request, as the
    tutorials do.
It reports requests/s, p50/p95/p99 latency and errors, on exported Fashion-MNIST test PNGs.
"""


import argparse
import asyncio
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


def plain_app(bundle_dir: str, port: int) -> None:
    """The tutorials' way: one process, model.predict on each request's single image."""
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
        probs = model.predict(image[None], verbose=0)[0]
        index = int(probs.argmax())
        return {"label": found.class_names[index], "label_index": index,
                "confidence": float(probs[index])}

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning")


async def load_level(url: str, blobs: list[bytes], concurrency: int, seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(session, offset: int):
        nonlocal errors
        i = offset
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                async with session.post(url, data=blobs[i % len(blobs)],
                                        headers={"Content-Type": "image/png"}) as response:
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
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    time.sleep(2)  # let the "listening" side settle
                    return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    sys.exit(f"server did not start: {' '.join(command)}; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "plain":
        plain_app(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="runs/bench/serve")
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--model", help="bundle (default: the seed CNN, trained for 1 epoch)")
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
    blobs = [p.read_bytes() for p in sorted(images.rglob("*.png"))]
    variants = {
        "batched (max batch 32)": ["serve", "--max-batch-size", "32"],
        "unbatched (max batch 1)": ["serve", "--max-batch-size", "1"],
        "plain FastAPI, predict per request": None,
    }
    results: dict[str, dict[int, dict]] = {}
    for name, serve_args in variants.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if serve_args:
            command = [sys.executable, "-m", "clfsys.cli", *serve_args, "--model", bundle_dir,
                       "--port", str(port)]
        else:
            command = [sys.executable, "benchmarks/serve.py", "plain", bundle_dir, str(port)]
        proc = start(command, url, work / f"server_{port}.log")
        try:
            asyncio.run(load_level(f"{url}/predict", blobs, 8, 3))  # warm-up, not reported
            results[name] = {c: asyncio.run(load_level(f"{url}/predict", blobs, c,
                                                       args.seconds)) for c in LEVELS}
        finally:
            stop(proc)
        print(f"measured {name}", file=sys.stderr, flush=True)
    print(f"\n## Endpoint load: {args.seconds:.0f} s per level, {len(blobs)} Fashion-MNIST PNGs, "
          "2-core machine (load generator on the same cores)")
    print("| variant                            | conc | req/s  | p50 ms | p95 ms | p99 ms | "
          "errors |")
    print("|------------------------------------|------|--------|--------|--------|--------|"
          "--------|")
    for name, levels in results.items():
        for c, r in levels.items():
            print(f"| {name:<34} | {c:>4} | {r['rps']:>6.0f} | {r['p50']:>6.1f} | "
                  f"{r['p95']:>6.1f} | {r['p99']:>6.1f} | {r['errors']:>6} |")
    batched, unbatched, plain = (results[n][32] for n in variants)
    print(f"at concurrency 32: batched {batched['rps'] / plain['rps']:.1f}x the plain app "
          f"(target >= 3x), {batched['rps'] / unbatched['rps']:.1f}x unbatched (target >= "
          f"1.5x), p99 {batched['p99']:.0f} ms (target <= 250), errors {batched['errors']} "
          "(target 0)")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
