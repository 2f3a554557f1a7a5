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

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The tutorials' recipes (Adam, early stopping with the best weights restored) plus one clfsys
# option: the learning rate drops (x0.3) when validation accuracy stalls for 2 epochs.
PLATEAU = {"train.lr_plateau_patience": 2, "train.lr_plateau_factor": 0.3}
SEEDS = [
    # name, published test accuracy (None: not published), overrides
    ("MLP-350, Adam, early stopping, LR plateau", 0.882, {
        "model.arch": "mlp", "model.units": [350], "train.optimizer": "adam",
        "train.epochs": 30, "train.monitor": "val_accuracy", "train.patience": 5, **PLATEAU}),
    ("CNN 542,230 params, Adam, early stop, LR plateau", 0.908, {
        "model.arch": "cnn", "train.optimizer": "adam", "train.epochs": 30,
        "train.monitor": "val_accuracy", "train.patience": 5, **PLATEAU}),
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
    parser.add_argument("--repeats", type=int, default=3, help="training seeds per model")
    parser.add_argument("--out", default="runs/bench/seeds.json")
    args = parser.parse_args()
    base = load_config("jobs/fashion_mnist.yaml", ["train.tensorboard=false"])
    dataset = load(base.data)
    rows = []
    for name, published, overrides in SEEDS:
        if args.only and args.only.lower() not in name.lower():
            continue
        runs = []
        for seed in range(args.repeats):
            cfg = base.replace(**overrides, **{"train.seed": seed})
            print(f"\n== {name}, seed {seed}", flush=True)
            started = time.perf_counter()
            result = train(cfg, dataset=dataset)
            test = evaluate(result.model, dataset.x_test, dataset.y_test, dataset.class_names)
            runs.append({"accuracy": test["accuracy"], "epochs": result.epochs_run,
                         "wall_s": time.perf_counter() - started})
        accuracy = np.array([r["accuracy"] for r in runs])
        rows.append({
            "model": name, "params": result.model.count_params(), "published": published,
            "mean": round(float(accuracy.mean()), 4), "std": round(float(accuracy.std()), 4),
            "best": round(float(accuracy.max()), 4), "runs": runs,
            "epochs": "/".join(str(r["epochs"]) for r in runs),
            "wall_s": round(float(np.mean([r["wall_s"] for r in runs])), 1),
        })
    print(f"\nFashion-MNIST test accuracy over {args.repeats} training seeds "
          "(validation: stratified 10% of train; test: the official 10,000)")
    header = (f"| {'model':<48} | {'params':>8} | published | ours: mean +- std | best   "
              f"| delta (mean) | epochs run | wall s/run |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        pub = f"{r['published']:.3f}" if r["published"] else "  n/a"
        delta = f"{r['mean'] - r['published']:+.4f}" if r["published"] else "n/a"
        print(f"| {r['model']:<48} | {r['params']:>8,} | {pub:>9} | "
              f"{r['mean']:.4f} +- {r['std']:.4f}  | {r['best']:.4f} | {delta:>12} | "
              f"{r['epochs']:>10} | {r['wall_s']:>10} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
