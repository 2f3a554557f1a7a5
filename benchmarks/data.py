"""Data benchmarks for image folders (`make bench-data`).

1. streaming: a generated folder of 96x96 RGB JPEGs (a class-specific bright half on noise), at
   each of --sizes images, trained for --epochs epochs in a fresh process per run: in memory
   (data.cache: memory) and streamed from the decoded cache (data.cache: disk,
   data.memory_budget_mb = --budget). Peak RSS of the training process, and the time of its
   last epoch (the cache already built, TensorFlow warm). Targets: the streamed run's peak RSS
   within 20% from the smallest to the largest size; its epoch <= 1.3x the in-memory epoch.
2. decode: a 6-trial search on a generated folder streamed from the cache: decodes / files in
   the folder (target <= 1.05). Decodes are counted in the search's driver, the only process
   that decodes: trials receive shards, not files.
3. photos: jobs/image_folder.yaml's search on the real hymenoptera photos, from scratch, one
   search per architecture family of its space: the best trial's test accuracy per family, the
   baseline that `model.weights: imagenet` improves on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLASSES = ("left", "right", "top")

TRAIN_RUN = """
import json, sys, time
import keras
from clfsys.config import load_config
from clfsys.train import train

cfg = load_config(None, []).replace(**json.loads(sys.argv[1]))
times = []

class Clock(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        times.append(time.perf_counter() - self.started)

def peak_rss_mb():
    # VmHWM resets at exec; ru_maxrss would carry over the forking parent's peak.
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

result = train(cfg, callbacks=[Clock()])
print(json.dumps({"epoch_s": times, "val_accuracy": result.history["val_accuracy"],
                  "peak_rss_mb": peak_rss_mb(),
                  "summary": result.dataset.summary()}))
"""


def _write_images(args: tuple[Path, int, int, int]) -> int:
    import numpy as np
    from PIL import Image

    folder, start, count, side = args
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        label = i % len(CLASSES)
        image = rng.integers(0, 80, size=(side, side, 3), dtype=np.uint8)
        half = side // 2
        region = ((slice(None), slice(0, half)), (slice(None), slice(half, None)),
                  (slice(0, half), slice(None)))[label]
        image[region] = rng.integers(170, 256, size=image[region].shape, dtype=np.uint8)
        Image.fromarray(image).save(folder / CLASSES[label] / f"img_{i:07d}.jpg", quality=90)
    return count


def generate(folder: Path, images: int, side: int) -> Path:
    """`images` JPEGs in class folders (reused when already there)."""
    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
    chunk = 2000
    jobs = [(folder, start, min(chunk, images - start), side)
            for start in range(0, images, chunk)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        written = sum(pool.map(_write_images, jobs))
    print(f"generated {written} {side}x{side} JPEGs in {folder} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    done.touch()
    return folder


def train_run(folder: Path, side: int, epochs: int, extra: dict) -> dict:
    overrides = {"data.dataset": "folder", "data.path": str(folder),
                 "data.image_size": [side, side], "data.test_fraction": 0.02,
                 "data.val_fraction": 0.05, "model.arch": "cnn", "model.filters": [16, 32],
                 "model.dense": 64, "train.epochs": epochs, "train.batch_size": 64,
                 "train.early_stopping": False, "train.tensorboard": False,
                 "train.verbose": 0, **extra}
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", TRAIN_RUN, json.dumps(overrides)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"training run failed:\n{run.stderr[-3000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def streaming(args) -> dict:
    work = Path(args.out)
    rows = {}
    for size in args.sizes:
        folder = generate(work / f"folder-{size}", size, args.side)
        cache = work / f"cache-{size}"
        shutil.rmtree(cache, ignore_errors=True)
        for mode, extra in (("memory", {"data.cache": "memory"}),
                            ("streamed", {"data.cache": "disk", "data.cache_path": str(cache),
                                          "data.memory_budget_mb": args.budget})):
            rows[(size, mode)] = train_run(folder, args.side, args.epochs, extra)
            r = rows[(size, mode)]
            print(f"{size} images, {mode}: peak RSS {r['peak_rss_mb']:.0f} MB, epochs "
                  f"{[round(t, 1) for t in r['epoch_s']]} s", file=sys.stderr)
    print(f"\n## Streaming vs in-memory: {args.side}x{args.side} RGB, {args.epochs} epochs, "
          f"cnn [16, 32], batch 64, data.memory_budget_mb={args.budget}")
    print("| images  | mode     | peak RSS MB | last epoch s | whole run s | val acc |")
    print("|---------|----------|-------------|--------------|-------------|---------|")
    for (size, mode), r in rows.items():
        print(f"| {size:>7,} | {mode:<8} | {r['peak_rss_mb']:>11.0f} | "
              f"{r['epoch_s'][-1]:>12.1f} | {r['wall_s']:>11.1f} | "
              f"{r['val_accuracy'][-1]:>7.4f} |")
    small, large = min(args.sizes), max(args.sizes)
    growth = rows[(large, "streamed")]["peak_rss_mb"] / rows[(small, "streamed")]["peak_rss_mb"]
    ratios = {size: rows[(size, "streamed")]["epoch_s"][-1] / rows[(size, "memory")]["epoch_s"][-1]
              for size in args.sizes}
    print(f"streamed peak RSS, {large:,} vs {small:,} images: {growth:.2f}x (target within "
          f"1.2x); streamed epoch / in-memory epoch: "
          + ", ".join(f"{s:,}: {r:.2f}x" for s, r in ratios.items()) + " (target <= 1.3x)")
    return {"streaming": {f"{s}-{m}": r for (s, m), r in rows.items()}}


def decode_work(args) -> dict:
    """Count every decode in the search's driver; trials receive shards and cannot decode."""
    from clfsys import folders
    from clfsys.config import load_config
    from clfsys.search import run_search

    folder = generate(Path(args.out) / "folder-decode", 3000, 64)
    calls = []
    real = folders.decode_file

    def counting(path, size, cfg):
        calls.append(path)
        return real(path, size, cfg)

    folders.decode_file = counting
    cfg = load_config(None, []).replace(**{
        "data.dataset": "folder", "data.path": str(folder), "data.image_size": [64, 64],
        "data.cache": "disk", "data.memory_budget_mb": 8, "model.arch": "cnn",
        "model.filters": [8], "model.dense": 16, "train.tensorboard": False,
        "tune.num_samples": 6, "tune.max_epochs": 2, "tune.scheduler": "none",
        "tune.space": {"train.lr": {"loguniform": [1.0e-3, 1.0e-2]}}})
    out = Path(args.out) / "decode-search"
    shutil.rmtree(out, ignore_errors=True)
    result = run_search(cfg, out)
    files = sum(1 for f in folder.rglob("*.jpg"))
    print(f"\n## Decode work: a {result['trials']}-trial search on {files:,} files: "
          f"{len(calls):,} decodes = {len(calls) / files:.3f} per file (target <= 1.05)")
    return {"decode": {"files": files, "decodes": len(calls), "trials": result["trials"]}}


def photos(args) -> dict:
    import yaml

    from clfsys.config import load_config
    from clfsys.search import run_search

    job = yaml.safe_load(Path("jobs/image_folder.yaml").read_text())
    rows = {}
    for arch, conditional in job["tune"]["space"]["model.arch"].items():
        cfg = load_config("jobs/image_folder.yaml", ["train.tensorboard=false"])
        space = {**cfg.tune.space, "model.arch": {arch: conditional}}
        cfg = cfg.replace(**{"tune.space": space, "tune.num_samples": args.photo_samples})
        out = Path(args.out) / f"photos-{arch}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        result = run_search(cfg, out)
        rows[arch] = {**result, "wall_s": round(time.perf_counter() - started, 1)}
    print(f"\n## Real photos: hymenoptera (ants / bees), jobs/image_folder.yaml, from scratch, "
          f"{args.photo_samples} trials per family")
    print("| family              | test acc | best val acc | epochs | wall s |")
    print("|---------------------|----------|--------------|--------|--------|")
    for arch, r in rows.items():
        print(f"| {arch:<19} | {r['test_accuracy']:>8.4f} | {r['val_accuracy']:>12.4f} | "
              f"{r['epochs_total']:>6} | {r['wall_s']:>6} |")
    return {"photos": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["streaming", "decode", "photos", "all"],
                        default="all")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 100_000])
    parser.add_argument("--side", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--budget", type=int, default=256, help="data.memory_budget_mb")
    parser.add_argument("--photo-samples", type=int, default=4)
    parser.add_argument("--out", default="runs/bench/data")
    args = parser.parse_args()
    results = {}
    if args.part in ("streaming", "all"):
        results.update(streaming(args))
    if args.part in ("decode", "all"):
        results.update(decode_work(args))
    if args.part in ("photos", "all"):
        results.update(photos(args))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
