"""`make gpu-check`: the GPU paths on a real accelerator, each checked and timed.

1. train one epoch (Fashion-MNIST, 10,000 images) and check that TensorFlow placed the model's
   weights on the GPU;
2. a 4-trial search with `tune.resources.gpu=0.5`: two trials must share the card at once (two
   processes on it in nvidia-smi at the same moment, the same CUDA_VISIBLE_DEVICES in trials.csv),
   which TensorFlow's memory growth makes possible;
3. label 20,000 exported PNGs with `--num-gpus 1`;
4. serve the best bundle with `--num-gpus 0.5 --replicas 2` (two replicas on the card), under 32
   closed-loop clients for 15 s.

It prints a table: images/s and the most GPU memory used during each step. On a machine without a
GPU (no `nvidia-smi`, or it lists none) it says so in one line and exits 0. Exit 1 when a check
fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gpus() -> list[str]:
    """The GPUs nvidia-smi lists ([] without the tool or a card)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        listed = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in listed.stdout.splitlines() if line.startswith("GPU ")] \
        if listed.returncode == 0 else []


def query(*args: str) -> list[str]:
    done = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=30)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


class GpuWatch(threading.Thread):
    """Samples the first GPU every 0.5 s: the most memory used, and the most processes on it at
    once."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mb, self.most_processes = 0.0, 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            used = query("--query-gpu=memory.used")
            if used:
                self.peak_mb = max(self.peak_mb, float(used[0]))
            self.most_processes = max(self.most_processes,
                                      len(query("--query-compute-apps=pid")))
            self.stopping.wait(0.5)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.join(5)


def clfsys(*args: str, timeout: int = 3600) -> dict:
    """Run `clfsys ARGS`; its JSON result line."""
    done = subprocess.run([sys.executable, "-m", "clfsys.cli", *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"gpu-check: `clfsys {' '.join(args)}` exited {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


TRAIN_ON_GPU = """
import json, sys, time
from clfsys.config import load_config
from clfsys.train import train
cfg = load_config("jobs/fashion_mnist.yaml", ["data.limit=10000", "train.epochs=1",
                                              "train.tensorboard=false"])
started = time.perf_counter()
result = train(cfg)
wall = time.perf_counter() - started
devices = sorted({w.value.device for w in result.model.trainable_weights})
print(json.dumps({"devices": devices, "images_per_s": 9000 / wall}))
"""


def check_train(rows: list[dict]) -> None:
    with GpuWatch() as watch:
        done = subprocess.run([sys.executable, "-c", TRAIN_ON_GPU], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, timeout=1800)
    found = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    on_gpu = bool(found.get("devices")) and all("GPU" in d for d in found["devices"])
    rows.append({"step": "train 1 epoch", "check": f"weights on {found.get('devices')}",
                 "ok": on_gpu, "images_per_s": found.get("images_per_s"),
                 "gpu_mb": watch.peak_mb})


def check_search(rows: list[dict], work: Path) -> Path:
    import pandas as pd

    with GpuWatch() as watch:
        result = clfsys("tune", "--config", "jobs/fashion_mnist.yaml",
                        "--out", str(work / "search"),
                        "--set", "data.limit=6000", "--set", "tune.num_samples=4",
                        "--set", "tune.max_epochs=2", "--set", "tune.scheduler=none",
                        "--set", "tune.resources.gpu=0.5", "--set", "tune.max_concurrent_trials=2")
    table = pd.read_parquet(work / "search" / "trials.parquet")
    devices = set(table["cuda_visible_devices"].astype(str))
    shared = watch.most_processes >= 2 and len(devices) == 1
    rows.append({"step": "search, 4 trials at gpu 0.5",
                 "check": f"{watch.most_processes} processes on the card at once, "
                          f"CUDA_VISIBLE_DEVICES {sorted(devices)}",
                 "ok": shared and result["trials"] == 4, "images_per_s": None,
                 "gpu_mb": watch.peak_mb})
    return work / "search" / "best"


def check_label(rows: list[dict], work: Path, bundle: Path) -> None:
    pngs = work / "pngs"
    if not pngs.exists():
        clfsys("export-images", "--split", "train", "--limit", "20000", "--out", str(pngs))
    with GpuWatch() as watch:
        result = clfsys("label", "--model", str(bundle), "--input", str(pngs), "--output",
                        str(work / "labels"), "--num-gpus", "1", "--batch-size", "1024")
    rows.append({"step": "label 20,000 PNGs, --num-gpus 1",
                 "check": f"{result['labelled']} labelled, {result['missing']} missing",
                 "ok": result["labelled"] == 20000 and result["missing"] == 0,
                 "images_per_s": result["files_per_s"], "gpu_mb": watch.peak_mb})


async def closed_loop(url: str, body: bytes, clients: int, seconds: float) -> tuple[int, int]:
    import aiohttp

    ok = failed = 0
    ends = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        async def client():
            nonlocal ok, failed
            while time.monotonic() < ends:
                async with session.post(url, data=body,
                                        headers={"Content-Type": "image/png"}) as response:
                    await response.read()
                    ok, failed = (ok + 1, failed) if response.status == 200 else (ok, failed + 1)

        await asyncio.gather(*(client() for _ in range(clients)))
    return ok, failed


def check_serve(rows: list[dict], work: Path, bundle: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from infra import clfsys_serve

    from clfsys.ingress import free_port

    port = free_port()
    server = clfsys_serve(work / "serve.log", dict(os.environ), "--model", str(bundle),
                          "--port", str(port), "--num-gpus", "0.5", "--replicas", "2",
                          "--metrics-port", str(free_port()))
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_healthy(url, timeout_s=600)  # (raises with the server's log if it dies)
        body = next((work / "pngs").rglob("*.png")).read_bytes()
        with GpuWatch() as watch:
            ok, failed = asyncio.run(closed_loop(f"{url}/predict", body, 32, 15.0))
        rows.append({"step": "serve, 2 replicas at --num-gpus 0.5",
                     "check": f"{watch.most_processes} processes on the card, {failed} errors",
                     "ok": watch.most_processes >= 2 and failed == 0 and ok > 0,
                     "images_per_s": ok / 15.0, "gpu_mb": watch.peak_mb})
        server.stop(signal.SIGINT)  # Ctrl-C: exit 0 and the result line
    finally:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)


def main() -> int:
    found = gpus()
    if not found:
        print("gpu-check: no GPU on this machine (nvidia-smi is missing or lists none); "
              "nothing to check")
        return 0
    work = ROOT / "runs" / "bench" / "gpu-check"
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check on {found[0]}", flush=True)
    rows: list[dict] = []
    check_train(rows)
    bundle = check_search(rows, work)
    check_label(rows, work, bundle)
    check_serve(rows, work, bundle)
    print("\n| step | check | ok | images/s | GPU memory, peak |\n|---|---|---|---|---|")
    for r in rows:
        rate = f"{r['images_per_s']:,.0f}" if r["images_per_s"] else ""
        print(f"| {r['step']} | {r['check']} | {'yes' if r['ok'] else 'NO'} | {rate} | "
              f"{r['gpu_mb']:,.0f} MB |")
    (work / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
