"""Reproduce the tutorials' reference models through clfsys on the full real Fashion-MNIST.

Prints a table: our test accuracy next to the published one, epochs run and wall time.
Run with `make bench` or `.venv/bin/python benchmarks/seeds.py [--only NAME]`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SEEDS = [
    # name, published test accuracy (None: not published), overrides
    ("MLP-350, Adam, early stopping", 0.882, {
        "model.arch": "mlp", "model.units": [350], "train.optimizer": "adam",
        "train.epochs": 60, "train.monitor": "val_accuracy", "train.patience": 8}),
    ("CNN 542,230 params, Adam, early stopping", 0.908, {
        "model.arch": "cnn", "train.optimizer": "adam", "train.epochs": 40,
        "train.monitor": "val_accuracy", "train.patience": 5}),
    ("CNN + batch norm, SGD, 5 epochs", None, {
        "model.arch": "cnn_bn", "train.optimizer": "sgd", "train.lr": 0.01,
        "train.momentum": 0.9, "train.epochs": 5, "train.early_stopping": False}),
]


def main() -> None:
    from clfsys.config import load_config
    from clfsys.data import load
    from clfsys.train import evaluate, train

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", help="run only the seeds whose name contains this text")
    parser.add_argument("--out", default="runs/bench/seeds.json")
    args = parser.parse_args()
    base = load_config("jobs/fashion_mnist.yaml", ["train.tensorboard=false"])
    dataset = load(base.data)
    rows = []
    for name, published, overrides in SEEDS:
        if args.only and args.only.lower() not in name.lower():
            continue
        cfg = base.replace(**overrides)
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        result = train(cfg, dataset=dataset)
        test = evaluate(result.model, dataset.x_test, dataset.y_test, dataset.class_names)
        rows.append({
            "model": name, "params": result.model.count_params(), "published": published,
            "ours": round(test["accuracy"], 4), "epochs": result.epochs_run,
            "best_epoch": result.best_epoch, "wall_s": round(time.perf_counter() - started, 1),
        })
    header = (f"| {'model':<42} | {'params':>8} | published | ours   | delta   | epochs (best) "
              "| wall s |")
    print("\n" + header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        pub = f"{r['published']:.3f}" if r["published"] else "  n/a"
        delta = f"{r['ours'] - r['published']:+.4f}" if r["published"] else "   n/a"
        print(f"| {r['model']:<42} | {r['params']:>8,} | {pub:>9} | {r['ours']:.4f} | {delta:>7} "
              f"| {r['epochs']:>6} ({r['best_epoch']:>2})   | {r['wall_s']:>6} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
