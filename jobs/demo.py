"""`make demo`: the main job end to end on the real Fashion-MNIST, through the real CLI.

Each step is printed as the command a user would type.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_and_ask(bundle: Path, folder: Path, count: int) -> list[dict]:
    """Start `clfsys serve`, send it a few exported PNGs over HTTP, print, stop with Ctrl-C."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model", str(bundle), "--port", str(port)]
    print(f"\n$ clfsys {shlex.join(args)}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "clfsys.cli", *args], cwd=ROOT,
                              stdout=subprocess.DEVNULL, start_new_session=True)
    answers = []
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("demo step failed: the server did not come up")
                time.sleep(0.5)
        files = sorted(folder.rglob("*.png"))
        for path in files[:: max(1, len(files) // count)][:count]:
            request = urllib.request.Request(f"{url}/predict", data=path.read_bytes(),
                                              headers={"Content-Type": "image/png"})
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())
            answers.append(answer)
            print(f"POST /predict {path.relative_to(folder)} -> {answer['label']} "
                  f"({answer['confidence']:.0%})", flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return answers


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
    answers = serve_and_ask(bundle, exported, count=5)
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
    print(f"endpoint:        answered {len(answers)} HTTP requests, then shut down cleanly")


if __name__ == "__main__":
    main()
