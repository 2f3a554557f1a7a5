"""Soak: long runs that must not leak or fail (`make bench-soak`).

  --part serve: `clfsys serve` (HAProxy ingress, the default) under closed-loop load at
      concurrency 32 for --minutes (default 10): every answer must be a 200, and the replica's
      RSS, sampled after each 30 s window, must stay within 10% after the first minute.
  --part label: `clfsys label` over --files (default 200,000) small PNGs: the driver's and the
      Predictor actor's RSS, sampled every 0.25 s with the driver's own progress count, must
      stay within 10% after the first 20,000 files while the actor labels. Anonymous memory
      (RssAnon, what a leak grows) is reported beside RSS, which also counts object-store and
      file pages.
  --part listing: the label driver's listing (`label.list_inputs`) of 50,000 and of --files
      of those PNGs, each in a fresh process, from the local folders and from the same keys on
      S3 (SeaweedFS on 127.0.0.1): seconds, and the growth of the process's RSS (the paths it
      holds), per 100,000 inputs.

Load goes to 127.0.0.1 only; every loop is bounded by time or count and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from clfsys.processes import titled

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
FLAT = 1.10


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 1e6


def anon_mb(pids: list[int]) -> float:
    """The processes' anonymous resident memory (RssAnon): what a leak grows. RSS also counts
    the pages of Ray's object store (shared memory) and of files that a process has touched,
    which come and go with the blocks it holds."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"^RssAnon:\s+(\d+) kB", status, re.M).group(1))
        except (OSError, AttributeError):
            continue
    return total / 1e3


def flatness(values: list[float]) -> float:
    return max(values) / min(values) if values else float("nan")


def soak_serve(work: Path, bundle_dir: Path, minutes: float) -> dict:
    from conftest import free_port, pattern_image
    from PIL import Image
    from serve import load_level, start, stop

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(16):
        buffer = io.BytesIO()
        Image.fromarray(pattern_image(i % 3, 20, rng)).save(buffer, "PNG")
        bodies.append((buffer.getvalue(), {"Content-Type": "image/png"}))
    server = start([sys.executable, "-m", "clfsys.cli", "serve", "--model", str(bundle_dir),
                    "--port", str(port)], url, work / "serve.log")
    windows = []
    try:
        ends = time.monotonic() + minutes * 60
        while time.monotonic() < ends:
            level = asyncio.run(load_level(f"{url}/predict", bodies, 32,
                                           min(30.0, ends - time.monotonic())))
            replicas = titled(b"ray::ServeReplica:clfsys:")
            windows.append({"t_s": round(minutes * 60 - (ends - time.monotonic())),
                            "requests": level["requests"], "errors": level["errors"],
                            "rps": round(level["rps"]), "p99_ms": round(level["p99"], 1),
                            "replica_rss_mb": round(rss_mb(replicas), 1)})
            print(json.dumps(windows[-1]), flush=True)
    finally:
        stop(server)
    after = [w["replica_rss_mb"] for w in windows if w["t_s"] > 60]
    return {"windows": windows, "requests": sum(w["requests"] for w in windows),
            "errors": sum(w["errors"] for w in windows),
            "replica_rss_flatness_after_1min": round(flatness(after), 3)}


def small_pngs(work: Path, files: int) -> Path:
    """`files` random 28x28 PNGs in subfolders of 1,000 (made once)."""
    from PIL import Image

    folder = work / f"pngs_{files}"
    if not (folder / "complete").exists():
        rng = np.random.default_rng(0)
        for i in range(files):
            target = folder / f"{i // 1000:04d}" / f"{i:07d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(target)
        (folder / "complete").touch()
    return folder


def soak_label(work: Path, bundle_dir: Path, files: int) -> dict:
    folder = small_pngs(work, files)
    out = work / "labels"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    driver = subprocess.Popen([sys.executable, "-m", "clfsys.cli", "label", "--model",
                               str(bundle_dir), "--input", str(folder), "--output", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    progress = [0]

    def follow():
        for line in driver.stderr:
            found = re.match(r"labelled (\d+)/", line)
            if found:
                progress[0] = int(found.group(1))

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    samples = []
    started = time.monotonic()
    while driver.poll() is None and time.monotonic() - started < 3600:
        actors = titled(b"ray::MapWorker(MapBatches(LabelActor))")
        samples.append({"t_s": round(time.monotonic() - started, 1), "labelled": progress[0],
                        "driver_rss_mb": round(rss_mb([driver.pid]), 1),
                        "actor_rss_mb": round(rss_mb(actors), 1),
                        "driver_anon_mb": round(anon_mb([driver.pid]), 1),
                        "actor_anon_mb": round(anon_mb(actors), 1)})
        time.sleep(0.25)
    stdout, _ = driver.communicate(timeout=600)
    reader.join(10)
    summary = json.loads(stdout.strip().splitlines()[-1])
    # While the pipeline runs: the driver prints its last progress line (labelled N/N) when it
    # has drained, then reads the whole output back to count it, which is not the labelling.
    after = [s for s in samples if 20_000 <= s["labelled"] < files]
    return {"files": summary["files"], "missing": summary["missing"],
            "files_per_s": summary.get("files_per_s"), "exit": driver.returncode,
            "samples": samples[::max(1, len(samples) // 80)],
            "driver_peak_mb": max(s["driver_rss_mb"] for s in samples),
            "driver_rss_flatness_after_20k": round(flatness(
                [s["driver_rss_mb"] for s in after]), 3),
            "actor_rss_flatness_after_20k": round(flatness(
                [s["actor_rss_mb"] for s in after]), 3),
            "driver_anon_flatness_after_20k": round(flatness(
                [s["driver_anon_mb"] for s in after]), 3),
            "actor_anon_flatness_after_20k": round(flatness(
                [s["actor_anon_mb"] for s in after]), 3)}


def listing(base: str, count: int) -> dict:
    """List the first `count` files under `base` (a folder or a URI; its subfolders of 1,000)
    in a fresh process, as `clfsys label --input DIR...` does before it starts Ray. The storage
    client is made (and its imports paid) before the RSS is first read."""
    child = f"""
import json, os, time
from clfsys import storage
from clfsys.label import list_inputs
def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
dirs = [{base!r} + f'/{{i:04d}}' for i in range({-(-count // 1000)})]
storage.is_file(dirs[0] + '/0000000.png')
before, started = rss(), time.perf_counter()
paths = list_inputs(dirs)
print(json.dumps({{"inputs": len(paths), "seconds": time.perf_counter() - started,
                  "rss_growth_mb": (rss() - before) / 1e6}}))
"""
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def listing_part(work: Path, files: int) -> dict:
    from infra import S3Server
    from label import upload

    from clfsys import storage

    folder = small_pngs(work, files)
    s3 = S3Server(work / "s3").start()
    try:
        os.environ.update(s3.env)
        started = time.perf_counter()
        upload((f, storage.join(s3.uri("listing"), str(f.relative_to(folder))))
               for f in sorted(folder.rglob("*.png")))
        print(f"uploaded {files:,} PNGs to S3 in {time.perf_counter() - started:.0f} s")
        result = {}
        for where, base in (("local folders", str(folder)), ("S3", s3.uri("listing"))):
            runs = [listing(base, count) for count in (50_000, files)]
            for found in runs:
                print(f"{where}: {found['inputs']:,} inputs listed in {found['seconds']:.2f} s;"
                      f" driver RSS +{found['rss_growth_mb']:.1f} MB")
            small, large = runs
            per = ((large["rss_growth_mb"] - small["rss_growth_mb"]) /
                   (large["inputs"] - small["inputs"]) * 1e5)
            print(f"{where}: growth per 100,000 inputs between the two: {per:.1f} MB "
                  "(target <= 50)")
            result[where] = {"runs": runs, "growth_per_100k_mb": round(per, 1)}
        return result
    finally:
        s3.stop()


def main() -> None:
    from label import make_bundle

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=("serve", "label", "listing"), required=True)
    parser.add_argument("--work", default="runs/bench/soak")
    parser.add_argument("--minutes", type=float, default=10.0, help="serve: how long")
    parser.add_argument("--files", type=int, default=200_000, help="label: how many files")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.part == "listing":
        result = listing_part(work, args.files)
        (work / "listing.json").write_text(json.dumps(result, indent=1))
        return
    bundle_dir = make_bundle(work / "bundle_fmnist_1", ["train.epochs=1", "data.limit=10000"])
    if args.part == "serve":
        result = soak_serve(work, bundle_dir, args.minutes)
        verdict = (f"{result['requests']} requests, {result['errors']} errors; replica RSS "
                   f"max/min after the first minute {result['replica_rss_flatness_after_1min']}"
                   f" (target <= {FLAT})")
    else:
        result = soak_label(work, bundle_dir, args.files)
        verdict = (f"{result['files']} files, {result['missing']} missing, exit "
                   f"{result['exit']}; RSS max/min after 20,000 files: driver "
                   f"{result['driver_rss_flatness_after_20k']}, actor "
                   f"{result['actor_rss_flatness_after_20k']}; anonymous memory (RssAnon): "
                   f"driver {result['driver_anon_flatness_after_20k']}, actor "
                   f"{result['actor_anon_flatness_after_20k']} (target <= {FLAT})")
    (work / f"{args.part}.json").write_text(json.dumps(result, indent=1))
    print(verdict)


if __name__ == "__main__":
    main()
