"""`make demo`: the main job end to end on the real Fashion-MNIST, through the real CLI.

Each step is printed as the command a user would type. With `--cluster` (`make demo-cluster`)
it runs on a local two-node Ray cluster whose worker node cannot see this machine's files, with
a local S3 server (SeaweedFS) as the only shared storage: the search checkpoints to S3, the best
bundle, the images to label and the labels live there, and the endpoint's replicas (one per
node) read the bundle from it. Both are torn down at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from clfsys.ingress import free_port

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ)
"""The environment of every command: RAY_ADDRESS and the AWS variables with --cluster."""


def run(*args: str) -> dict:
    command = [sys.executable, "-m", "clfsys.cli", *args]
    print(f"\n$ clfsys {shlex.join(args)}", flush=True)
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=ENV)
    if done.returncode != 0:
        sys.exit(f"demo step failed (exit {done.returncode}): clfsys {shlex.join(args)}")
    line = done.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    return json.loads(line)


def serve_and_ask(bundle: str, folder: Path, count: int, *extra: str) -> list[dict]:
    """Start `clfsys serve`, send it a few exported PNGs over HTTP, print, stop with Ctrl-C."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model", bundle, "--port", str(port), "--metrics-port", str(free_port()),
            *extra]
    print(f"\n$ clfsys {shlex.join(args)}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "clfsys.cli", *args], cwd=ROOT,
                              stdout=subprocess.DEVNULL, start_new_session=True, env=ENV)
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
        v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                          "data": [base64.b64encode(path.read_bytes()).decode()]}]}
        request = urllib.request.Request(f"{url}/v2/models/clfsys/infer",
                                         data=json.dumps(v2).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            outputs = {o["name"]: o["data"] for o in json.loads(response.read())["outputs"]}
        print(f"POST /v2/models/clfsys/infer (Open Inference Protocol) {path.name} -> "
              f"{outputs['label'][0]}", flush=True)
        nodes = set()
        for _ in range(20):
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
                nodes.add(json.loads(response.read())["node_id"][:8])
        print(f"GET /healthz x20: answered by replicas on node(s) {', '.join(sorted(nodes))}",
              flush=True)
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
    parser.add_argument("--cluster", action="store_true",
                        help="on a local two-node cluster with a local S3 server")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if not args.cluster:
        demo(args, out, place=str)
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from infra import LocalCluster, S3Server, can_isolate_nodes

    from clfsys.bundle import cache_root

    why_not = can_isolate_nodes()
    if why_not:
        sys.exit(f"demo-cluster: {why_not}")
    s3 = S3Server(out / "s3")
    cluster = None
    try:
        print("starting a local S3 server (SeaweedFS) and a two-node Ray cluster whose worker "
              f"cannot see {out} ...", flush=True)
        s3.start()
        os.environ.update(s3.env)  # this process uploads the images to label
        # Serve's proxy prefers replicas on its own node; off here, so that the requests of
        # the demo reach the replicas on both nodes.
        cluster = LocalCluster([out, cache_root()], head_cpus=2, worker_cpus=2, env={
            **s3.env, "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}).start()
        ENV.update(cluster.client_env)
        print(f"S3 endpoint {s3.endpoint}, bucket {s3.bucket}; Ray at {cluster.address} with "
              f"{len(cluster.nodes())} nodes", flush=True)
        demo(args, out, place=lambda local: s3.uri("demo", Path(local).relative_to(out)
                                                   .as_posix()), cluster=True)
    finally:
        if cluster is not None:
            cluster.stop()
        s3.stop()
        print(f"cluster and S3 server stopped (the bucket's data stays in {out / 's3'})",
              flush=True)


def demo(args, out: Path, place, cluster: bool = False) -> None:
    """The demo's steps; `place(local path)` says where shared things live (S3 on a cluster)."""
    search = place(out / "search")
    tune_args = ["tune", "--config", "jobs/fashion_mnist.yaml",
                 "--set", f"data.limit={args.limit}", "--set", f"tune.num_samples={args.samples}",
                 "--set", f"tune.max_epochs={args.epochs}", "--set", "tune.grace_period=1"]
    if cluster:
        tune_args += ["--set", f"tune.storage_path={place(out / 'ray')}"]
    searched = run(*tune_args, "--out", search)
    bundle = searched["bundle"]
    tested = run("evaluate", "--model", bundle)
    exported = out / "images"
    run("export-images", "--dataset", "fashion_mnist", "--split", "test", "--out",
        str(exported), "--limit", str(args.label_images))
    inputs = str(exported)
    if cluster:
        from clfsys import storage

        inputs = place(exported)
        print(f"\n(uploading the PNGs to {inputs})", flush=True)
        storage.copy_tree(exported, inputs)
    labels = place(out / "labels")
    labelled = run("label", "--model", bundle, "--input", inputs, "--output", labels)
    extra = ["--replicas", "2", "--max-replicas-per-node", "1"] if cluster else []
    answers = serve_and_ask(bundle, exported, 5, *extra)
    print("\n== demo done ==")
    print(f"search:          {searched['trials']} trials, {searched['epochs_total']} epochs, "
          f"{searched['wall_s']:.0f} s; table in {search}/trials.csv")
    print(f"report:          {search}/report/index.html")
    print(f"best model:      {bundle}  (trial {searched['best_trial']}, "
          f"model_id {searched['model_id']})")
    print(f"test accuracy:   {tested['accuracy']:.4f} on {tested['examples']} test images")
    print(f"plots:           {bundle}/plots/{{learning_curves,confusion_matrix,samples}}.png")
    logs = place(out / "ray") if cluster else f"{search}/ray"
    print(f"TensorBoard:     tensorboard --logdir {logs}/search")
    print(f"labels:          {labelled['labelled']} of {labelled['files']} exported test PNGs "
          f"labelled into {labels} ({labelled['files_per_s']:.0f} files/s, "
          f"{labelled['needs_review']} need review); report {labels}/_report.html")
    print(f"endpoint:        answered {len(answers)} HTTP requests, then shut down cleanly")


if __name__ == "__main__":
    main()
