"""`make demo`: the main job end to end on the real Fashion-MNIST, through the real CLI.

Each step is printed as the command a user would type.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> dict:
    command = [sys.executable, "-m", "clfsys.cli", *args]
    print(f"\n$ clfsys {shlex.join(args)}", flush=True)
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"demo step failed (exit {done.returncode}): clfsys {shlex.join(args)}")
    line = done.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--samples", type=int, default=4, help="trials of the small search")
    parser.add_argument("--epochs", type=int, default=3, help="max epochs per trial")
    parser.add_argument("--limit", type=int, default=12000, help="training images used")
    parser.add_argument("--label-images", type=int, default=2000,
                        help="test images exported as PNGs and labelled")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    search = out / "search"
    searched = run("tune", "--config", "jobs/fashion_mnist.yaml",
                   "--set", f"data.limit={args.limit}", "--set", f"tune.num_samples={args.samples}",
                   "--set", f"tune.max_epochs={args.epochs}", "--set", "tune.grace_period=1",
                   "--out", str(search))
    bundle = search / "best"
    tested = run("evaluate", "--model", str(bundle))
    exported = out / "images"
    run("export-images", "--dataset", "fashion_mnist", "--split", "test", "--out",
        str(exported), "--limit", str(args.label_images))
    labels = out / "labels"
    labelled = run("label", "--model", str(bundle), "--input", str(exported), "--output",
                   str(labels))
    print("\n== demo done ==")
    print(f"search:          {searched['trials']} trials, {searched['epochs_total']} epochs, "
          f"{searched['wall_s']:.0f} s; table in {search / 'trials.csv'}")
    print(f"report:          {search / 'report' / 'index.html'}")
    print(f"best model:      {bundle}  (trial {searched['best_trial']}, "
          f"model_id {searched['model_id']})")
    print(f"test accuracy:   {tested['accuracy']:.4f} on {tested['examples']} test images")
    print(f"plots:           {bundle / 'plots'}/{{learning_curves,confusion_matrix,samples}}.png")
    print(f"TensorBoard:     tensorboard --logdir {search / 'ray' / 'search'}")
    print(f"labels:          {labelled['labelled']} of {labelled['files']} exported test PNGs "
          f"labelled into {labels} ({labelled['files_per_s']:.0f} files/s, "
          f"{labelled['needs_review']} need review)")


if __name__ == "__main__":
    main()
