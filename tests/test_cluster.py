"""clfsys on a real two-node Ray cluster whose worker node cannot see the head's files, with a
real S3 server (SeaweedFS) as the only storage both nodes share.

The worker node declares two logical GPUs (GPU placement without a GPU). Its raylet runs in its
own mount namespace with an empty tmpfs over this session's pytest
directory and over the bundle cache, so anything only the head's disk holds is invisible to it,
as on a real cluster. Every command runs as a user would run it: `clfsys ...` on the head with
RAY_ADDRESS set.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, read_trials
from infra import LocalCluster, can_isolate_nodes, clfsys_serve
from PIL import Image

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(can_isolate_nodes() is not None,
                                 reason=f"no isolated worker nodes: {can_isolate_nodes()}")]


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    from clfsys.bundle import cache_root

    hidden = [tmp_path_factory.getbasetemp(), cache_root()]
    # Serve's proxy prefers replicas on its own node; off, so requests reach every replica.
    env = {**s3.env, "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
    nodes = LocalCluster(hidden, head_cpus=2, worker_cpus=2, worker_gpus=2, env=env).start()
    yield nodes
    nodes.stop()


def clfsys(cluster: LocalCluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clfsys.cli", *args], cwd=ROOT,
                          env=cluster.client_env, capture_output=True, text=True,
                          timeout=timeout)


def result_line(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_pngs(root: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buffer, "PNG")
        files.append(root / f"{i:05d}.png")
        files[-1].write_bytes(buffer.getvalue())
    return files


def output_paths(output: str) -> list[str]:
    from clfsys import label_output

    return label_output.read_output(output, ["path"]).column("path").to_pylist()


PROBE = """
import json, os, sys, ray
ray.init()
@ray.remote(num_cpus=0)
def look(path):
    return ray.get_runtime_context().get_node_id(), os.path.exists(path)
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
print(json.dumps(dict(ray.get([look.options(label_selector={"ray.io/node-id": n}).remote(
    sys.argv[1]) for n in nodes]))))
"""


def test_the_worker_node_cannot_see_the_heads_files(cluster, tmp_path):
    (tmp_path / "here.txt").write_text("head only")
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "here.txt")],
                          env=cluster.client_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    head = cluster.head_node_id()
    assert len(seen) == 2 and seen == {node: node == head for node in seen}


def test_label_head_local_inputs_is_complete(cluster, trained_bundle, tmp_path):
    files = write_pngs(tmp_path / "in", 300)
    out = tmp_path / "labels"
    done = clfsys(cluster, "label", "--model", str(trained_bundle), "--input",
                  str(tmp_path / "in"), "--output", str(out), "--batch-size", "32",
                  "--actors", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = result_line(done)
    assert (summary["labelled"], summary["unread"], summary["missing"]) == (300, 0, 0)
    paths = output_paths(str(out))
    assert sorted(paths) == sorted(map(str, files))
    assert "decoding on this node" in done.stderr

    # Declared shared when they are not: the worker node's decode tasks cannot read them. The
    # run says so and exits 1; nothing becomes an error row.
    lied = clfsys(cluster, "label", "--model", str(trained_bundle), "--input",
                  str(tmp_path / "in"), "--output", str(tmp_path / "lied"), "--batch-size",
                  "32", "--shared-inputs")
    assert lied.returncode == 1, lied.stderr[-3000:]
    summary = result_line(lied)
    assert summary["unread"] > 0 and summary["errors"] == {} and \
        summary["labelled"] + summary["unread"] == 300
    assert "no such file" in lied.stderr


def test_label_s3_inputs_into_s3_output_every_file_once(cluster, s3, trained_bundle, tmp_path):
    from clfsys import storage

    files = write_pngs(tmp_path / "in", 400, seed=1)
    storage.copy_tree(tmp_path / "in", s3.uri("inputs", "a"))
    storage.copy_tree(trained_bundle, s3.uri("bundles", "small"))
    out = s3.uri("labels", "a")
    done = clfsys(cluster, "label", "--model", s3.uri("bundles", "small"), "--input",
                  s3.uri("inputs", "a"), "--output", out, "--batch-size", "32", "--actors", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    paths = output_paths(out)
    assert sorted(paths) == sorted(s3.uri("inputs", "a", f.name) for f in files)
    assert json.loads(storage.read_text(storage.join(out, "_summary.json")))["labelled"] == 400
    assert storage.is_file(storage.join(out, "_report.html"))


def wait_for_rows(output: str, timeout_s: float = 300) -> None:
    from clfsys import label_output

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if label_output.output_files(output):
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no output appeared in {output}")


def test_a_killed_s3_labelling_run_resumes_every_file_once(cluster, s3, trained_bundle,
                                                          tmp_path):
    from clfsys import storage

    files = write_pngs(tmp_path / "in", 3000, seed=2)
    storage.copy_tree(tmp_path / "in", s3.uri("inputs", "b"))
    out = s3.uri("labels", "b")
    args = [sys.executable, "-m", "clfsys.cli", "label", "--model", str(trained_bundle),
            "--input", s3.uri("inputs", "b"), "--output", out, "--batch-size", "16"]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(args, cwd=ROOT, env=cluster.client_env, stdout=log,
                                 stderr=log, start_new_session=True)
        wait_for_rows(out)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    partial = output_paths(out)
    assert 0 < len(partial) < 3000, (tmp_path / "first.log").read_text()[-2000:]
    done = clfsys(cluster, *args[3:], "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    paths = output_paths(out)
    assert len(paths) == len(set(paths)) == 3000
    assert set(paths) == {s3.uri("inputs", "b", f.name) for f in files}
    assert f"{len(partial)} already labelled" in done.stderr


def test_a_node_lost_mid_run_leaves_every_file_labelled_once(cluster, s3, trained_bundle,
                                                             tmp_path):
    """The worker node dies (raylet and workers killed) while labelling S3 into S3: the run
    completes with every file once, or exits 1 naming what is unread and `--resume` then
    labels exactly that."""
    from clfsys import storage

    files = write_pngs(tmp_path / "in", 3000, seed=4)
    inputs, out = s3.uri("inputs", "d"), s3.uri("labels", "d")
    storage.copy_tree(tmp_path / "in", inputs)
    args = ["label", "--model", str(trained_bundle), "--input", inputs, "--output", out,
            "--batch-size", "16"]
    try:
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen([sys.executable, "-m", "clfsys.cli", *args], cwd=ROOT,
                                     env=cluster.client_env, stdout=subprocess.PIPE,
                                     stderr=log, text=True, start_new_session=True)
            wait_for_rows(out)
            cluster.kill_worker()
            stdout, _ = first.communicate(timeout=600)
        text = (tmp_path / "first.log").read_text()
        assert first.returncode in (0, 1), text[-3000:]
        summary = json.loads(stdout.strip().splitlines()[-1])
        print(f"node lost mid-label: exit {first.returncode}, {summary.get('unread', 0)} unread")
        if first.returncode == 1:
            assert summary["unread"] > 0 and summary["missing"] == summary["unread"], summary
            unread = json.loads(storage.read_text(storage.join(out, "_unread.json")))
            assert len(unread) == summary["unread"]
            done = clfsys(cluster, *args, "--resume")
            assert done.returncode == 0, done.stderr[-3000:]
    finally:
        if 0 not in cluster.worker_sessions:
            cluster.restart_worker()
    paths = output_paths(out)
    assert len(paths) == len(set(paths)) == 3000
    assert set(paths) == {storage.join(inputs, f.name) for f in files}


def test_storage_failure_mid_run_exits_non_zero_and_resume_completes(cluster, s3,
                                                                     trained_bundle, tmp_path):
    from clfsys import storage

    write_pngs(tmp_path / "in", 640, seed=3)
    storage.copy_tree(tmp_path / "in", s3.uri("inputs", "c"))
    out = tmp_path / "labels"
    args = ["label", "--model", str(trained_bundle), "--input", s3.uri("inputs", "c"),
            "--output", str(out), "--batch-size", "64"]
    first = subprocess.Popen([sys.executable, "-m", "clfsys.cli", *args], cwd=ROOT,
                             env=cluster.client_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = []
    try:
        for line in first.stderr:  # the files are listed: the S3 server goes away now
            log.append(line)
            if "to label" in line:
                s3.stop()
                break
        log += first.stderr.readlines()
        first.wait(timeout=600)
        text = "".join(log)
        assert first.returncode == 1, text[-3000:]
        stdout = first.stdout.read()
        assert stdout.strip(), text[-6000:]
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["unread"] > 0 and summary["missing"] == summary["unread"]
        assert summary["errors"] == {}  # a failure to read is never an error row
        assert f"{summary['unread']} files could not be read" in text
        unread = json.loads((out / "_unread.json").read_text())
        assert len(unread) == summary["unread"]
        assert all(path.startswith(s3.uri("inputs", "c")) for path in unread)
    finally:
        if s3.process is None:
            s3.start()
    done = clfsys(cluster, *args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len({r["path"] for r in rows}) == 640
    assert all(r["error"] is None for r in rows)
    assert not (out / "_unread.json").exists()


def search_config(tmp_path: Path, storage_path: str) -> Path:
    from conftest import job_config

    return job_config(tmp_path, f"""
  num_samples: 4
  max_concurrent_trials: 2
  scheduler: none
  max_epochs: 3
  max_failures: 1
  resources: {{cpu: 2}}
  storage_path: {storage_path}
  space: {{train.lr: {{choice: [0.005, 0.01, 0.02, 0.03]}}}}
""")


def test_a_local_storage_path_is_refused_on_a_multi_node_cluster(cluster, tmp_path):
    config = search_config(tmp_path, str(tmp_path / "ray"))
    done = clfsys(cluster, "tune", "--config", str(config), "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "tune.storage_path" in done.stderr and "s3://" in done.stderr
    assert not (tmp_path / "ray").exists()  # refused before any trial started


def test_a_warm_start_from_a_local_folder_is_refused_when_trials_continue_on_a_cluster(
        cluster, s3, tmp_path):
    """Continued trials read the earlier checkpoints wherever they land; the worker node cannot
    see the head's folder, so the search is refused before any trial starts."""
    import pandas as pd

    earlier = tmp_path / "earlier"
    checkpoint = earlier / "ray" / "search" / "trial_e1" / "checkpoint_000002"
    checkpoint.mkdir(parents=True)
    for name in ("state.json", "model.keras", "best.keras"):
        (checkpoint / name).write_text("{}")
    pd.DataFrame([{"trial_id": "e1", "param.train.lr": 0.01, "best_val_accuracy": 0.8,
                   "epochs_run": 2, "stopped_by": "max_epochs", "checkpoint": str(checkpoint)}]
                 ).to_parquet(earlier / "trials.parquet")
    config = search_config(tmp_path, s3.uri("refused-warm"))
    done = clfsys(cluster, "tune", "--config", str(config), "--out", s3.uri("refused-warm-out"),
                  "--warm-start", str(earlier), "--set", "tune.warm_start.continue_top=1")
    assert done.returncode == 2, done.stderr[-3000:]
    assert (f"tune.warm_start.path is {earlier}, a local path, but the cluster has 2 nodes: "
            "they could not read the earlier trials' checkpoints there") in done.stderr
    assert "warm start: 1 earlier trials" in done.stderr
    from clfsys import storage

    assert not storage.list_files(s3.uri("refused-warm"))  # no trial started


def test_search_on_s3_runs_on_both_nodes_retries_and_resumes(cluster, s3, tmp_path):
    from search_job import epochs_begun, went_on

    from clfsys import storage

    experiment = s3.uri("tune", "search")
    config = search_config(tmp_path, s3.uri("tune"))
    out, log = s3.uri("tune-out"), s3.uri("tune-epochs")
    command = [sys.executable, str(Path(__file__).with_name("search_job.py")), str(config), out,
               log, "--fail-once"]
    earlier_actors = cluster.alive_actors()
    with open(tmp_path / "first.log", "w") as first:
        driver = subprocess.Popen(command, cwd=ROOT, env=cluster.client_env, stdout=first,
                                  stderr=first, start_new_session=True)
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and driver.poll() is None:
            try:
                if any(3 in epochs for epochs in epochs_begun(log).values()):
                    break
            except Exception:
                pass
            time.sleep(0.5)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    cluster.wait_actors_gone(earlier_actors)  # the killed search's trials log no more epochs
    first_log = (tmp_path / "first.log").read_text()
    before = epochs_begun(log)
    assert any(3 in e for e in before.values()), first_log[-3000:]
    assert not storage.exists(storage.join(out, "trials.csv"))

    done = subprocess.run(command + ["--resume"], cwd=ROOT, env=cluster.client_env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    table = read_trials(storage.read_bytes(storage.join(out, "trials.csv")))
    assert len(table) == 4 and (table["status"] == "TERMINATED").all(), table.to_string()
    assert table["failure"].isna().all() and (table["epochs_run"] == 3).all()
    assert set(table["node_id"]) == {n["node_id"] for n in cluster.nodes()}
    # Each trial failed once after epoch 2 and went on from its checkpoint, and the resumed
    # search went on from where each trial was: none began again from scratch.
    after = epochs_begun(log)
    for trial in table["trial_id"]:
        assert went_on(before.get(trial, []), after[trial], 3), (trial, before, after)
    log_text = first_log + done.stderr
    assert log_text.count("injected failure after epoch 2") >= 1
    assert "resuming from checkpoint at epoch 2" in log_text
    assert storage.is_file(storage.join(out, "best", "model.keras"))
    assert any("/logs/" in f and "events.out.tfevents" in f
               for f in storage.list_files(experiment))  # TensorBoard logs reached S3
    result = done.stdout.strip().splitlines()[-1]
    assert "'bundle': 's3://clfsys/tune-out/best'" in result

    # A search warm-started from this one goes on with its best trial from the checkpoint on
    # S3, wherever the trial lands, up to the new max_epochs.
    top = table.sort_values(["best_val_accuracy", "trial_id"], ascending=[False, True]).iloc[0]
    assert storage.is_file(storage.join(top["checkpoint"], "state.json"))
    warm = clfsys(cluster, "tune", "--config", str(config), "--out", s3.uri("warm-out"),
                  "--warm-start", out, "--set", "tune.max_epochs=4", "--set",
                  "tune.num_samples=1", "--set", "tune.warm_start.continue_top=1", "--set",
                  f"tune.storage_path={s3.uri('warm')}")
    assert warm.returncode == 0, warm.stderr[-4000:]
    assert result_line(warm)["warm_start"] == {"from": out, "earlier_trials": 4, "used": 4,
                                               "outside_space": 0, "continued": 1}
    went = read_trials(storage.read_bytes(s3.uri("warm-out", "trials.csv")))
    assert list(went["continued_from"]) == [top["trial_id"]]
    assert list(went["epochs_run"]) == [4] and "resuming from checkpoint at epoch 3" in \
        warm.stderr


def test_a_search_on_s3_survives_a_lost_node(cluster, s3, tmp_path):
    """The worker node dies while a trial trains there: that trial goes on from its S3
    checkpoint on the head, counted as an infrastructure failure, and the search completes."""
    from search_job import epochs_begun, went_on

    from clfsys import storage

    config = search_config(tmp_path, s3.uri("lost-tune"))
    config.write_text(config.read_text().replace("max_failures: 1", "max_failures: 2").replace(
        "num_samples: 4", "num_samples: 2"))
    out, log = s3.uri("lost-out"), s3.uri("lost-epochs")
    command = [sys.executable, str(Path(__file__).with_name("search_job.py")), str(config), out,
               log]
    try:
        with open(tmp_path / "search.log", "w") as output:
            driver = subprocess.Popen(command, cwd=ROOT, env=cluster.client_env, stdout=output,
                                      stderr=output, start_new_session=True)
            # One trial per node (2 CPUs each): the node is killed once both trials have begun
            # and the first has begun epoch 2. No trial can have finished then (3 epochs each),
            # so the worker's trial dies mid-run. (Waiting until both had begun epoch 2 let the
            # worker's trial, started first, finish before the kill under load.)
            deadline = time.monotonic() + 400
            before: dict[str, list[int]] = {}
            while time.monotonic() < deadline and driver.poll() is None:
                try:
                    before = epochs_begun(log)
                except Exception:
                    before = {}
                if len(before) == 2 and any(2 in epochs for epochs in before.values()):
                    break
                time.sleep(0.3)
            assert driver.poll() is None, "the search ended before the node could be killed"
            cluster.kill_worker()
            # What each trial had begun when the node died: the worker's trial may have begun
            # another epoch since the last look, which it then begins again from its checkpoint.
            before = epochs_begun(log)
            driver.wait(timeout=600)
        text = (tmp_path / "search.log").read_text()
        assert driver.returncode == 0, text[-4000:]
    finally:
        if 0 not in cluster.worker_sessions:
            cluster.restart_worker()
    table = read_trials(storage.read_bytes(storage.join(out, "trials.csv")))
    assert len(table) == 2 and (table["status"] == "TERMINATED").all(), table.to_string()
    assert (table["epochs_run"] == 3).all()
    lost = table[table["failures"] > 0]
    print(f"node lost mid-search: {len(lost)} trial(s) went on elsewhere: "
          f"{lost[['trial_id', 'failures', 'last_failure']].to_dict('records')}")
    assert len(lost) >= 1 and (lost["last_failure"] == "infrastructure").all(), table.to_string()
    after = epochs_begun(log)
    for trial in table["trial_id"]:  # from its checkpoint, not from scratch
        assert went_on(before.get(trial, []), after[trial], 3), (trial, before, after)


def healthz_nodes(url: str, expected: set[str], timeout_s: float = 120) -> set[str]:
    """The nodes whose replicas answered /healthz, polled until all of `expected` did (the
    second replica may still be warming up when the first answers)."""
    import requests

    nodes: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while nodes != expected and time.monotonic() < deadline:
        nodes.add(requests.get(f"{url}/healthz", timeout=10).json()["node_id"])
    return nodes


def test_serve_a_bundle_on_s3_with_a_replica_on_each_node(cluster, s3, trained_bundle,
                                                          tmp_path):
    import requests

    from clfsys import storage
    from clfsys.ingress import free_port

    storage.copy_tree(trained_bundle, s3.uri("bundles", "served"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    main = clfsys_serve(tmp_path / "main.log", cluster.client_env, "--model",
                        s3.uri("bundles", "served"), "--port", str(port), "--replicas", "2",
                        "--max-replicas-per-node", "1")
    other = None
    try:
        main.wait_healthy(url)
        every_node = {n["node_id"] for n in cluster.nodes()}
        assert healthz_nodes(url, every_node) == every_node
        image = io.BytesIO()
        Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(image, "PNG")
        answer = requests.post(f"{url}/predict", data=image.getvalue(),
                               headers={"Content-Type": "image/png"}, timeout=30)
        assert answer.status_code == 200 and answer.json()["label"] in ("left", "right", "top")

        # A second model on the same cluster, under /other; stopping it leaves the first one.
        other = clfsys_serve(tmp_path / "other.log", cluster.client_env, "--model",
                             str(trained_bundle), "--port", str(port), "--name", "other")
        other.wait_healthy(f"{url}/other")
        assert other.stop()["application"] == "other"
        assert requests.get(f"{url}/other/healthz", timeout=10).status_code == 404
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200

        # The worker node dies under steady load (4 clients, one request each at a time): the
        # replica on the head goes on answering. Until Ray has marked the node dead, requests
        # may still be sent to it and fail: both nodes' ingresses listen on this port (one
        # network namespace, SO_REUSEPORT), so a client may lose its connection to the dead
        # node's, and the head's may route a request to the dead replica before it has seen
        # that replica fail. Every request asked after Ray marked the node dead is answered 200.
        answers, dead = load_while_a_node_dies(cluster, f"{url}/predict", image.getvalue(),
                                               clients=4)
        failed = [[(s, round(t - dead, 1)) for s, t in client if s != 200] for client in answers]
        print(f"node lost under load: {sum(map(len, answers))} requests, not 200 by client "
              f"(status, seconds asked after Ray marked the node dead): {failed}")
        assert all(t < 0 for client in failed for _, t in client), failed
        head = cluster.head_node_id()
        assert [healthz_node(url) for _ in range(10)] == [head] * 10
    finally:
        results = [server.stop() for server in (other, main)
                   if server is not None and server.process.poll() is None]
        if 0 not in cluster.worker_sessions:
            cluster.restart_worker()
    assert results[-1]["application"] == "clfsys" and results[-1]["stopped_by"] == "SIGTERM"


def load_while_a_node_dies(cluster: LocalCluster, url: str, body: bytes, clients: int,
                           before_s: float = 3, most_s: float = 120) -> tuple[list[list], float]:
    """POST `body` to `url` from `clients` threads, each in a closed loop, and kill the worker
    node after `before_s`. The load goes on until Ray has marked that node dead and every
    client has had 5 answers in a row that were 200, each asked after that (at most `most_s`):
    a request stuck on the dead replica is answered only when Ray notices the death, so it
    counts. Returns each client's answers, as (the status or the exception's name, the
    time.monotonic() it was asked at), and when Ray marked the node dead."""
    import threading

    import requests

    answers: list[list] = [[] for _ in range(clients)]
    lock, stop = threading.Lock(), threading.Event()

    def client(i: int):
        with requests.Session() as session:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    status = session.post(url, data=body, timeout=60,
                                          headers={"Content-Type": "image/png"}).status_code
                except requests.RequestException as exc:
                    status = type(exc).__name__
                with lock:
                    answers[i].append((status, began))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(before_s)
    cluster.kill_worker()
    killed, dead, steady = time.monotonic(), None, False
    while not steady and time.monotonic() < killed + most_s:
        if dead is None and len(cluster.nodes()) == 1:
            dead = time.monotonic()
        with lock:
            steady = dead is not None and all(
                len(a) >= 5 and all(s == 200 and t > dead for s, t in a[-5:]) for a in answers)
        time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(90)
    assert dead is not None, f"Ray did not mark the killed node dead in {most_s} s"
    assert steady, f"no steady 200s {most_s} s after the kill: {answers}"
    print(f"node marked dead {dead - killed:.1f} s after the kill")
    return answers, dead


def healthz_node(url: str) -> str:
    import requests

    answer = requests.get(f"{url}/healthz", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["node_id"]


def test_a_submitted_gpu_search_runs_its_trials_on_the_gpu_node(cluster, s3, tmp_path):
    from clfsys import storage

    config = search_config(tmp_path, s3.uri("gpu-tune"))
    text = config.read_text().replace("resources: {cpu: 2}", "resources: {cpu: 1, gpu: 1}")
    config.write_text(text.replace("num_samples: 4", "num_samples: 2").replace(
        "max_epochs: 3", "max_epochs: 2"))
    url = f"http://127.0.0.1:{cluster.dashboard}"
    ray = str(Path(sys.executable).parent / "ray")
    stranger = {**cluster.env, "HOME": str(tmp_path)}  # no token anywhere
    del stranger["RAY_AUTH_TOKEN"]
    refused = subprocess.run([ray, "job", "submit", "--address", url, "--", "echo", "hi"],
                             env=stranger, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0

    out = s3.uri("gpu-out")
    submit = [ray, "job", "submit", "--address", url, "--working-dir", str(ROOT), "--",
              "python", "jobs/tune.py", "--config", str(config), "--out", out]
    deadline = time.monotonic() + 120
    while True:  # the head's job agent can take a while to come up on a loaded machine
        done = subprocess.run(submit, env=cluster.env, capture_output=True, text=True,
                              timeout=600)
        if "No available agent" not in done.stderr + done.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    table = read_trials(storage.read_bytes(storage.join(out, "trials.csv")))
    gpu_nodes = [n["node_id"] for n in cluster.nodes() if n["resources_total"].get("GPU")]
    assert len(table) == 2 and (table["status"] == "TERMINATED").all()
    assert len(gpu_nodes) == 1 and (table["node_id"] == gpu_nodes[0]).all()
    assert set(table["cuda_visible_devices"]) <= {"0", "1"}
    assert storage.is_file(storage.join(out, "best", "metadata.json"))
