"""Search benchmarks on the real Fashion-MNIST (`make bench-search`).

1. quality: the default search of jobs/fashion_mnist.yaml on the full data within a wall-clock
   budget; the best model's test accuracy next to the tutorials' 0.908 and the upstream 0.934.
2. efficiency: on a 10,000-image subset, the same 12 sampled configurations run (a) to
   max_epochs without a scheduler and (b) with ASHA (clfsys's default: promotions); epochs spent
   and best validation accuracy of each. Keras early stopping is off in both, so the difference
   is ASHA's alone. The space is the issue's: architectures (the tutorials' MLP and CNN, the
   batch-norm and wide CNNs), learning rate, optimizer, batch size, dropout, augmentation.
3. selection: the trials of the quality search (or, with --part selection/efficiency, of the
   ASHA run above) selected again with tune.select.max_latency_ms at half the latency of the
   most accurate trial: the accuracy given up and the latency gained, the constrained best
   bundle evaluated on the test split like any best bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def search(overrides: dict, out: Path) -> tuple[dict, Any]:
    import pandas as pd

    from clfsys.config import load_config
    from clfsys.search import run_search

    cfg = load_config("jobs/fashion_mnist.yaml", ["train.tensorboard=false"]).replace(
        **overrides)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = run_search(cfg, out)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result, pd.read_csv(out / "trials.csv")


def quality(args) -> dict:
    result, table = search({"tune.time_budget_s": args.budget}, Path(args.out) / "quality")
    rows = [("tutorial CNN (published)", 0.908), ("upstream: 2 conv + pool + BN (published)",
                                                  0.934)]
    print(f"\n## Search quality: default search, {args.budget:.0f} s budget, full Fashion-MNIST")
    print(f"| {'model':<44} | test accuracy |")
    print(f"|{'-' * 46}|{'-' * 15}|")
    for name, value in rows:
        print(f"| {name:<44} | {value:>13.3f} |")
    print(f"| {'clfsys search best (' + result['best_trial'] + ')':<44} | "
          f"{result['test_accuracy']:>13.4f} |")
    print(f"trials: {result['trials']} ({result['errored']} errored), epochs: "
          f"{result['epochs_total']}, wall: {result['wall_s']} s, best val accuracy "
          f"{result['val_accuracy']}, target >= 0.925: "
          f"{'met' if result['test_accuracy'] >= 0.925 else 'NOT met'}")
    return {"quality": result}


EFFICIENCY_SPACE = """
train.lr: {loguniform: [1.0e-4, 1.0e-2]}
train.optimizer: {choice: [sgd, adam]}
train.batch_size: {choice: [32, 128]}
model.augment: {choice: [false, true]}
model.arch:
  mlp: {model.units: {choice: [[128], [300, 100]]}}
  cnn: {}
  cnn_bn: {model.dropout: {uniform: [0.1, 0.4]}}
  cnn_wide: {model.dropout: {uniform: [0.1, 0.4]}}
"""


def efficiency(args) -> dict:
    import yaml

    base = {"data.limit": 10000, "tune.num_samples": 12, "tune.max_epochs": args.max_epochs,
            "tune.seed": args.seed, "train.early_stopping": False,
            "tune.space": yaml.safe_load(EFFICIENCY_SPACE)}
    runs = {}
    for name, extra in (("(a) no scheduler, max_epochs", {"tune.scheduler": "none"}),
                        ("(b) ASHA", {"tune.scheduler": "asha",
                                      "tune.grace_period": args.grace_period,
                                      "tune.reduction_factor": args.reduction_factor})):
        result, table = search({**base, **extra}, Path(args.out) / name.split()[0].strip("()"))
        runs[name] = {"epochs": int(table["epochs_run"].sum()),
                      "best_val_accuracy": float(table["best_val_accuracy"].max()),
                      "wall_s": result["wall_s"],
                      "configs": sorted(json.dumps({k: v for k, v in r.items()
                                                    if k.startswith("param.") and v == v})
                                        for r in table.to_dict("records"))}
    a, b = runs.values()
    assert a["configs"] == b["configs"], "the two runs sampled different configurations"
    print(f"\n## Search efficiency: 12 configurations, 10,000-image subset, "
          f"max_epochs {args.max_epochs}, ASHA grace {args.grace_period} / reduction factor "
          f"{args.reduction_factor}")
    print("| run                           | epochs | share | best val acc | wall s |")
    print("|-------------------------------|--------|-------|--------------|--------|")
    for name, r in runs.items():
        print(f"| {name:<29} | {r['epochs']:>6} | {r['epochs'] / a['epochs']:>5.0%} | "
              f"{r['best_val_accuracy']:>12.4f} | {r['wall_s']:>6} |")
    share = b["epochs"] / a["epochs"]
    gap = (b["best_val_accuracy"] - a["best_val_accuracy"]) * 100
    print(f"ASHA spends {share:.0%} of the epochs (target <= 40%); its best validation "
          f"accuracy is {gap:+.2f} points from (a)'s (target: no lower than -0.5)")
    return {"efficiency": {k: {kk: vv for kk, vv in v.items() if kk != "configs"}
                           for k, v in runs.items()}}


def reselect(search_out: Path, overrides: dict, out: Path) -> dict:
    """Select again among the trials of the search written to `search_out`, with
    `overrides` (tune.select...): the outputs, best bundle included, go to `out`."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    from clfsys import data as data_mod
    from clfsys.config import load_config
    from clfsys.results import write_outputs
    from clfsys.scheduler import STATE_FILE

    cfg = load_config("jobs/fashion_mnist.yaml", ["train.tensorboard=false"]).replace(
        **overrides)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if (search_out / STATE_FILE).exists():
        shutil.copy(search_out / STATE_FILE, out / STATE_FILE)
    grid = ResultGrid(ExperimentAnalysis(str(search_out / "ray" / "search")))
    return write_outputs(grid, cfg, data_mod.load(cfg.data), str(out), out, wall_s=0.0)


def selection(args, search_out: Path, overrides: dict) -> dict:
    import pandas as pd

    table = pd.read_csv(search_out / "trials.csv")
    finished = table[table["status"] == "TERMINATED"].sort_values(
        "best_val_accuracy", ascending=False, kind="stable")
    top = finished.iloc[0]
    limit = round(float(top["ms_per_image_b1"]) / 2, 4)
    free = json.loads((search_out / "best" / "metadata.json").read_text())["metrics"]
    picked = reselect(search_out, {**overrides, "tune.select.max_latency_ms": limit},
                      Path(args.out) / "selection")
    chosen = table[table["trial_id"] == picked["best_trial"]].iloc[0]
    print(f"\n## Serving-aware selection: tune.select.max_latency_ms = {limit} (half the "
          f"most accurate trial's {top['ms_per_image_b1']} ms per image at batch 1)")
    print("| selection      | trial        | arch      | val acc | test acc | ms/img b1 | "
          "ms/img b32 | params   |")
    print("|----------------|--------------|-----------|---------|----------|-----------|"
          "------------|----------|")
    for name, row, test in (("accuracy only", top, free["test_accuracy"]),
                            ("within limit", chosen, picked["test_accuracy"])):
        print(f"| {name:<14} | {row['trial_id']:<12} | {str(row['param.model.arch']):<9} | "
              f"{row['best_val_accuracy']:.4f} | {test:>8.4f} | {row['ms_per_image_b1']:>9} | "
              f"{row['ms_per_image_b32']:>10} | {int(row['params']):>8} |")
    val_lost = 100 * (top["best_val_accuracy"] - chosen["best_val_accuracy"])
    test_lost = 100 * (free["test_accuracy"] - picked["test_accuracy"])
    print(f"given up: {val_lost:.2f} points of validation accuracy, {test_lost:.2f} "
          f"of test accuracy; gained: {top['ms_per_image_b1'] / chosen['ms_per_image_b1']:.1f}x "
          f"lower latency at batch 1; ruled out: {picked.get('ruled_out')}")
    return {"selection": {"limit_ms": limit, "accuracy_only": top["trial_id"],
                          "within_limit": picked}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["quality", "efficiency", "selection", "all"],
                        default="all", help="selection runs after quality, or alone after "
                        "a finished efficiency run")
    parser.add_argument("--budget", type=float, default=1800.0, help="quality: seconds")
    parser.add_argument("--max-epochs", type=int, default=12, help="efficiency: epochs")
    parser.add_argument("--grace-period", type=int, default=2, help="efficiency: ASHA")
    parser.add_argument("--reduction-factor", type=int, default=3, help="efficiency: ASHA")
    parser.add_argument("--seed", type=int, default=1, help="efficiency: searcher seed")
    parser.add_argument("--out", default="runs/bench/search")
    args = parser.parse_args()
    results = {}
    if args.part in ("quality", "all"):
        results.update(quality(args))
    if args.part in ("efficiency", "all"):
        results.update(efficiency(args))
    if args.part in ("quality", "all"):
        results.update(selection(args, Path(args.out) / "quality",
                                 {"tune.time_budget_s": args.budget}))
    elif args.part in ("efficiency", "selection"):
        results.update(selection(args, Path(args.out) / "b", {"data.limit": 10000}))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
