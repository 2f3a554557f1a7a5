"""Labelling throughput and memory (`make bench-label`).

Data: (a) all 70,000 Fashion-MNIST images exported as PNGs; (b) the hymenoptera photos repeated
(--photo-copies, default 25: 9,925 files; the issue asks for at least 2,000). For each, in the
same run:
  - `clfsys label` end to end (Ray Data -> Parquet) with 1 and 2 Predictor actors,
  - the same with 1 actor on a Ray node that is already running (`on_a_running_node`), as on a
    cluster: Ray's start and stop are not the command's,
  - a single-process baseline: tf.data decode + model.predict in batches of 1024, no Parquet,
  - the tutorials' per-image loop (load one image, model.predict on it), on a sample,
  - Daft (with --daft-python, as `make bench-label` runs it): the same job as Daft's docs would
    have it written (`daft_job`), in its own environment (locks/daft.txt),
  - the driver's writer alone (without --only, or --only writer): rows/s that the driver turns
    into Parquet files locally and on S3 (directly and through DELAY_MS each way), the ceiling
    of a cluster's labelling rate,
  - `clfsys label` with 1 actor reading its inputs from and writing its output to a local S3
    server (SeaweedFS on 127.0.0.1, the same files uploaded first), against local files on one node
    (--no-s3 leaves it out); and the same through a TCP proxy adding DELAY_MS each way
    (tests/infra.py's DelayProxy: the order of S3's first-byte latency for small objects); each
    prints the CPU seconds the S3 server and the proxy used meanwhile (on the same cores),
  - the S3 reader alone (with S3): 2,000 of the first dataset's files read 32 at a time, through
    `storage.read_many` (obstore) and through pyarrow in a thread per read, with and without
    the proxy;
  - the S3 reads of a Ray Data pipeline (with S3): the same 2,000 objects read in one pipeline
    by clfsys's decode-task reader (`label.read_files`) and by Ray's own concurrent downloader,
    `ray.data.expressions.download` (alpha in Ray 2.60), with and without the proxy.
Every file is read once before timing (a warm page cache for all). Each variant runs --repeats
times (interleaved; the median run is reported), each run as its own process session; peak
memory is the largest sum of the RSS of every process in that session (driver, Ray daemons and
workers), sampled every 0.2 s, and beside it the largest sum of their PSS (a page that several
processes share, such as TensorFlow's and Ray's libraries, counted once).
"End to end" is images / the process's wall time, for every variant: each pays its own start-up
(Python, TensorFlow, Ray) and exit. "In run" leaves those out where the variant can tell: the
baselines time from after the model is loaded, clfsys from when its listing is done (Ray start
included). The per-image loop runs on a sample, so its in-run rate is the fair figure for it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera"
DELAY_MS = 10


def session_memory(sid: int) -> tuple[int, int]:
    """Bytes resident in the session's processes: the sum of their RSS, which counts a page
    shared by several processes (a library such as TensorFlow's or Ray's, the object store) in
    each of them, and the sum of their PSS, which splits each shared page between its sharers."""
    from clfsys.processes import in_sessions, stat

    rss = pss = 0
    for pid in in_sessions(sid):
        if len(fields := stat(pid)) > 21:
            rss += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:  # gone, or (as another user) not readable
            continue
        pss += sum(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
    return rss, pss


def warm_page_cache(files: list[str]) -> None:
    """Read every file once before timing: otherwise the first variant alone pays cold reads."""
    for path in files:
        with open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds that process `pid` has used so far."""
    from clfsys.processes import stat

    fields = stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def measure(command: list[str], env: dict | None = None, watch: dict | None = None,
            sessions: list[int] | None = None) -> dict:
    """Run `command` in a new session; wall time, peak session RSS and PSS (`session_memory`,
    with those of `sessions` added: a running Ray node's), its JSON result line, and the CPU
    seconds used meanwhile by each process in `watch` (name -> pid: the S3 server, this
    process and its latency proxy)."""
    watch, sessions = watch or {}, sessions or []
    before = {name: cpu_seconds(pid) for name, pid in watch.items()}
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)
    peak = peak_pss = 0
    stop = threading.Event()

    def sample():
        nonlocal peak, peak_pss
        while not stop.is_set():
            rss, pss = map(sum, zip(*(session_memory(s) for s in [proc.pid, *sessions]),
                                    strict=True))
            peak, peak_pss = max(peak, rss), max(peak_pss, pss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{stderr[-3000:]}")
    return {"wall_s": time.perf_counter() - started, "peak_mb": peak / 2**20,
            "peak_pss_mb": peak_pss / 2**20,
            "cpu_s": {name: cpu_seconds(pid) - before[name] for name, pid in watch.items()},
            "result": json.loads(stdout.strip().splitlines()[-1])}


# --- baselines, run as `python benchmarks/label.py baseline ...` in their own process --------


def baseline(kind: str, bundle_dir: str, files_list: str, sample: int) -> None:
    import numpy as np
    import tensorflow as tf

    from clfsys.bundle import load

    found = load(bundle_dir)
    model = found.load_model()
    files = Path(files_list).read_text().splitlines()
    (h, w), channels = found.image_size, found.input_shape[2]
    started = time.perf_counter()
    if kind == "tfdata":
        def decode(path):
            image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                       expand_animations=False)
            return tf.cast(tf.image.resize(image, (h, w)), tf.uint8)

        data = (tf.data.Dataset.from_tensor_slices(files)
                .map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
                .prefetch(tf.data.AUTOTUNE))
        count = 0
        for batch in data:
            count += len(np.asarray(model.predict(batch, verbose=0)))
    else:  # the tutorials' loop: one image at a time
        import keras

        files = files[:sample]
        mode = "grayscale" if channels == 1 else "rgb"
        for path in files:
            image = keras.utils.img_to_array(keras.utils.load_img(
                path, color_mode=mode, target_size=(h, w)))
            model.predict(image[None].astype("uint8"), verbose=0)
        count = len(files)
    wall = time.perf_counter() - started
    print(json.dumps({"images": count, "images_per_s": count / wall}))


DAFT = "Daft 0.7: download, decode, @daft.cls predict(512)"


def daft_job(bundle_dir: str, folder: str, out: str) -> None:
    """The same job in Daft, as its docs would have a user write it (runs in the Daft
    environment, without clfsys): list the files, download the bytes, decode and resize to the
    model's input, run model.keras in a `@daft.cls` batch method, write Parquet."""
    import daft
    import keras
    import numpy as np
    import pyarrow.parquet as pq
    from daft import DataType
    from daft.functions import decode_image, download, image_to_tensor, resize

    metadata = json.loads((Path(bundle_dir) / "metadata.json").read_text())
    (h, w, channels), classes = metadata["input_shape"], metadata["class_names"]

    @daft.cls
    class Classifier:
        def __init__(self, model_file: str):
            self.model = keras.saving.load_model(model_file, compile=False)

        @daft.method.batch(return_dtype=DataType.struct(
            {"label": DataType.string(), "confidence": DataType.float32()}), batch_size=512)
        def __call__(self, pixels):
            images = pixels.to_pylist()  # None where the bytes were not an image
            decoded = [i for i, image in enumerate(images) if image is not None]
            rows: list[dict | None] = [None] * len(images)
            if decoded:
                batch = np.stack([images[i] for i in decoded]).reshape(-1, h, w, channels)
                probabilities = self.model.predict(batch, verbose=0)
                for i, p in zip(decoded, probabilities, strict=True):
                    rows[i] = {"label": classes[p.argmax()], "confidence": float(p.max())}
            return rows

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    classify = Classifier(str(Path(bundle_dir) / "model.keras"))
    df = daft.from_glob_path(f"{folder}/**/*")
    image = decode_image(download(df["path"]), on_error="null",  # a row for every file
                         mode="L" if channels == 1 else "RGB")
    df = df.with_column("pixels", image_to_tensor(resize(image, w, h)))
    df = df.with_column("prediction", classify(df["pixels"])).select("path", "prediction")
    df.write_parquet(out)
    count = pq.read_table(out, columns=["path"]).num_rows
    wall = time.perf_counter() - started
    print(json.dumps({"images": count, "images_per_s": count / wall}))


# --- the benchmark ----------------------------------------------------------------------------


def make_bundle(out: Path, overrides: list[str]) -> Path:
    if not (out / "metadata.json").exists():
        subprocess.run([sys.executable, "-m", "clfsys.cli", "train", "--out", str(out),
                        "--force", "--config", "jobs/fashion_mnist.yaml",
                        "--set", "train.tensorboard=false", *sum([["--set", o] for o in
                                                                 overrides], [])],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out


def prepare(work: Path, copies: int) -> dict[str, tuple[Path, Path]]:
    """Datasets and the bundles that label them."""
    fm = work / "fashion_mnist_png"
    if not fm.exists():
        for split in ("train", "test"):
            subprocess.run([sys.executable, "-m", "clfsys.cli", "export-images", "--split",
                            split, "--out", str(fm / split)], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
    from clfsys.images import is_image_path

    photos = work / f"hymenoptera_x{copies}"
    if not photos.exists():
        originals = sorted(p for p in HYMENOPTERA.rglob("*")  # the photos, not README.md
                           if p.is_file() and is_image_path(p))
        for copy in range(copies):
            for p in originals:
                target = photos / f"copy{copy}" / p.relative_to(HYMENOPTERA)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, target)
    fm_bundle = make_bundle(work / "bundle_fmnist_1", ["train.epochs=1", "data.limit=10000"])
    photo_bundle = make_bundle(work / "bundle_photos_64", [  # jobs/image_folder.yaml's model
        "data.dataset=folder", f"data.path={HYMENOPTERA / 'train'}",
        f"data.test_path={HYMENOPTERA / 'val'}", "data.image_size=[64, 64]", "model.arch=cnn_wide",
        "train.epochs=1", "train.batch_size=16"])
    return {"(a) Fashion-MNIST PNGs": (fm, fm_bundle),
            f"(b) hymenoptera photos x{copies}": (photos, photo_bundle)}


def writer_capacity(location: str, rows: int = 200_000, block: int = 2048) -> float:
    """Rows/s of the driver's side of `clfsys label` alone: what it does with each block the
    actors return (split off the unread rows, select the columns, write one Parquet file)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from clfsys import label, label_output, storage

    classes = [f"class_{i}" for i in range(10)]
    table = pa.Table.from_pylist([{
        "path": f"s3://bucket/inputs/fashion_mnist_png/train/{i % 10}/{i:07d}.png",
        "label": classes[i % 10], "label_index": i % 10, "confidence": 0.9,
        "top_k": [{"label": classes[(i + k) % 10], "score": 0.9 / (k + 1)} for k in range(3)],
        "needs_review": False, "error": None, "model_id": "0123456789abcdef",
        "read_error": None} for i in range(block)], schema=label._pipeline_schema())
    columns = label_output.schema().names
    writer = label_output.Writer(location)
    storage.make_dirs(location)
    started = time.perf_counter()
    for _ in range(rows // block):
        failed = table.column("read_error").is_valid()
        writer.write(table.filter(pc.invert(failed)).select(columns))
    writer.close()
    return writer.written / (time.perf_counter() - started)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "baseline":
        baseline(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "ray-reads":
        ray_reads(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "daft":
        daft_job(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="runs/bench/label")
    parser.add_argument("--sample", type=int, default=300, help="per-image loop: images")
    parser.add_argument("--photo-copies", type=int, default=25, help="(b): copies of the photos")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median)")
    parser.add_argument("--only", choices=("a", "b", "reads", "writer"),
                        help="run one dataset, (a) or (b), or only the S3 reads (needs S3), or "
                        "only the driver's writer")
    parser.add_argument("--no-s3", action="store_true", help="leave out the S3 variant")
    parser.add_argument("--daft-python", help="the Daft environment's python (make bench-label "
                        "makes runs/bench/daft-env); without it the Daft variant is left out")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = {}
    s3 = None
    if not args.no_s3:
        sys.path.insert(0, str(ROOT / "tests"))
        from infra import S3Server

        shutil.rmtree(work / "s3", ignore_errors=True)
        s3 = S3Server(work / "s3").start()
        os.environ.update(s3.env)  # this process uploads; the variant's process inherits it
    try:
        if args.only == "reads":
            if s3 is None:
                parser.error("--only reads measures S3 reads: leave out --no-s3")
            folder, _ = prepare(work, args.photo_copies)["(a) Fashion-MNIST PNGs"]
            report["reads alone"] = reads_alone(s3, sorted(
                str(p) for p in folder.rglob("*.png"))[:2000])
        else:
            if args.only in (None, "writer"):
                report["driver writer alone"] = writer_side(work, s3)
            if args.only != "writer":
                run_all(args, work, report, s3)
    finally:
        if s3 is not None:
            s3.stop()
    (work / "results.json").write_text(json.dumps(report, indent=2))


def writer_side(work: Path, s3) -> dict:
    """The driver's writer alone, to a local folder and to S3: every row of a cluster's run
    passes through it, so it must keep up with many nodes."""
    shutil.rmtree(work / "writer", ignore_errors=True)
    rates = {"local folder": writer_capacity(str(work / "writer"))}
    if s3 is not None:
        from infra import DelayProxy

        from clfsys import storage

        rates["S3"] = writer_capacity(s3.uri("writer", str(int(time.time()))))
        proxy = DelayProxy(int(s3.endpoint.rsplit(":", 1)[1]), DELAY_MS / 1000)
        try:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            storage.forget_clients()
            rates[f"S3, {DELAY_MS} ms each way"] = writer_capacity(
                s3.uri("writer", f"{int(time.time())}-delayed"))
        finally:
            os.environ["AWS_ENDPOINT_URL"] = s3.endpoint
            storage.forget_clients()
            proxy.stop()
    print("\n## the driver's writer alone (200,000 rows in blocks of 2,048)")
    for where, rate in rates.items():
        print(f"| {where:<22} | {rate:>9,.0f} rows/s |")
    return rates


def upload(pairs) -> None:
    """Each (local file, location) pair's bytes to its location, 32 writes at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from clfsys import storage

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda pair: storage.write_bytes(pair[1], Path(pair[0]).read_bytes()),
                      pairs))


def reads_alone(s3, files: list[str], in_flight: int = 32, repeats: int = 3) -> dict:
    """Objects/s of the reader alone, `in_flight` reads at a time (one decode task's window),
    with and without DELAY_MS each way: `storage.read_many` against the reader it replaced
    (pyarrow's `open_input_stream` in a thread per read: a HEAD, then a GET). Best of
    `repeats`, alternating."""
    from concurrent.futures import ThreadPoolExecutor

    from infra import DelayProxy

    from clfsys import storage

    inputs = s3.uri("reads-alone")
    keys = [storage.join(inputs, f"{i:05d}{Path(f).suffix}") for i, f in enumerate(files)]
    upload(zip(files, keys, strict=True))
    proxy = DelayProxy(int(s3.endpoint.rsplit(":", 1)[1]), DELAY_MS / 1000)
    rates: dict[str, dict[str, float]] = {}
    try:
        for added, endpoint in ((0, s3.endpoint), (DELAY_MS, proxy.url)):
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            storage.forget_clients()
            fs, _ = storage.resolve(inputs)

            def pyarrow_read(location: str, fs=fs) -> bytes:
                with fs.open_input_stream(storage.resolve(location)[1]) as handle:
                    return handle.read()

            def pyarrow_threads(window: list[str]) -> list[bytes]:
                with ThreadPoolExecutor(len(window)) as pool:
                    return list(pool.map(pyarrow_read, window))

            readers = {"pyarrow, a thread per read": pyarrow_threads,
                       "storage.read_many (obstore)": storage.read_many}
            for reader in readers.values():
                reader(keys[:in_flight])  # connections and clients made before timing
            for name, reader in readers.items():
                best = 0.0
                for _ in range(repeats):
                    started = time.perf_counter()
                    for i in range(0, len(keys), in_flight):
                        got = reader(keys[i:i + in_flight])
                        assert all(isinstance(g, bytes) for g in got), got[:1]
                    best = max(best, len(keys) / (time.perf_counter() - started))
                rates.setdefault(name, {})[f"{added} ms"] = best
    finally:
        os.environ["AWS_ENDPOINT_URL"] = s3.endpoint
        storage.forget_clients()
        proxy.stop()
    proxy = DelayProxy(int(s3.endpoint.rsplit(":", 1)[1]), DELAY_MS / 1000)
    try:
        rates["pipeline"] = pipeline_reads(keys, {"0 ms": s3.endpoint,
                                                  f"{DELAY_MS} ms": proxy.url})
    finally:
        proxy.stop()
    print(f"\n## S3 reads alone: {len(keys)} objects, {in_flight} in flight, best of {repeats}")
    print(f"| reader                      | objects/s, 0 ms | objects/s, {DELAY_MS} ms each way |")
    print("|-----------------------------|-----------------|---------------------------|")
    for name, rate in rates.items():
        if name != "pipeline":
            print(f"| {name:<27} | {rate['0 ms']:>15,.0f} | {rate[f'{DELAY_MS} ms']:>25,.0f} |")
    return rates


def ray_reads(reader: str, listing: str) -> None:
    """One Ray Data pipeline that reads every object in `listing` and sums the bytes: with
    `clfsys`, in decode tasks as `clfsys label` does (label.read_files, the breaker's window of
    reads in flight per task); with `download`, through ray.data.expressions.download (Ray's
    concurrent downloader: a metadata actor pool, then obstore) given the same filesystem.
    Prints the objects, bytes, reads that failed, and the seconds from the first block to the
    last (Ray's start left out)."""
    import numpy as np
    import ray

    from clfsys import label, storage
    from clfsys.cluster import init_ray

    uris = Path(listing).read_text().split()
    init_ray()
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    ds = ray.data.from_items([{"path": u} for u in uris], override_num_blocks=label.num_blocks(
        len(uris), 512, ray.cluster_resources().get("CPU", 1)))
    if reader == "download":
        from ray.data.expressions import download

        def sizes(batch):
            # a read that failed is a null (NaN in a numpy batch): the downloader logs it only
            return {"n": np.array([len(b) if isinstance(b, bytes) else -1
                                   for b in batch["bytes"]])}

        fs, _ = storage.resolve(uris[0])
        ds = ds.with_column("bytes", download("path", filesystem=fs)).map_batches(
            sizes, batch_format="numpy", num_cpus=label.TASK_CPUS)
    else:
        def sizes(batch):
            read = label.read_files([str(p) for p in batch["path"]], label.ReadBreaker())
            return {"n": np.array([len(b) if isinstance(b, bytes) else -1 for b in read])}

        ds = ds.map_batches(sizes, batch_format="numpy", batch_size=512,
                            num_cpus=label.TASK_CPUS)
    started = time.perf_counter()
    n = np.concatenate([b["n"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
    seconds = time.perf_counter() - started
    print(json.dumps({"objects": len(n), "bytes": int(n[n > 0].sum()),
                      "failed": int((n < 0).sum()), "seconds": seconds}))


def pipeline_reads(keys: list[str], endpoints: dict[str, str], repeats: int = 2) -> dict:
    """Objects/s of the two readers of a Ray Data pipeline (`ray_reads`), each run in its own
    process and Ray instance, alternating; best of `repeats` at each added latency."""
    listing = Path(os.environ.get("TMPDIR", "/tmp")) / "clfsys-bench-ray-reads.txt"
    listing.write_text("\n".join(keys))
    names = {"clfsys decode tasks (label.read_files)": "clfsys",
             "ray.data.expressions.download": "download"}
    rates: dict[str, dict[str, float]] = {}
    for added, endpoint in endpoints.items():
        for _ in range(repeats):
            for name, reader in names.items():
                # Ray's obstore client allows http only for http:// store URLs, not for an
                # s3:// URL with an http endpoint (a local S3 server): obstore reads this one.
                env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"}
                result = measure([sys.executable, "benchmarks/label.py", "ray-reads", reader,
                                  str(listing)], env)["result"]
                assert result["objects"] == len(keys) and result["failed"] == 0, (name, result)
                rate = result["objects"] / result["seconds"]
                best = rates.setdefault(name, {})
                best[added] = max(best.get(added, 0.0), rate)
    print(f"\n## S3 reads in a Ray Data pipeline: {len(keys)} objects, best of {repeats}, "
          "Ray's start left out")
    print(f"| reader                                 | objects/s, 0 ms | objects/s, {DELAY_MS} ms "
          "each way |")
    print("|----------------------------------------|-----------------|"
          "---------------------------|")
    for name, rate in rates.items():
        print(f"| {name:<38} | {rate['0 ms']:>15,.0f} | {rate[f'{DELAY_MS} ms']:>25,.0f} |")
    return rates


RUNNING = "clfsys label, 1 actor, Ray already running"


def on_a_running_node(command: list[str], warm_up: list[str]) -> dict:
    """`command` as on a cluster: a Ray node (`ray start --head`, all the CPUs) that was up
    before it and has run a job before (`warm_up`, untimed: a node's first job starts Ray Data's
    helper actors), so `clfsys label` with RAY_ADDRESS pays neither Ray's start nor its stop.
    Peak memory counts the node's processes too. The node lives for this run only, so it takes
    no CPU from the other variants."""
    sys.path.insert(0, str(ROOT / "tests"))
    from infra import LocalCluster

    node = LocalCluster([], head_cpus=os.cpu_count() or 1, workers=0).start()
    try:
        measure(warm_up, node.client_env)
        return measure(command, node.client_env, sessions=node.sessions)
    finally:
        node.stop()


def label_command(bundle_dir: Path, inputs, output, actors: int = 1) -> list[str]:
    return [sys.executable, "-m", "clfsys.cli", "label", "--model", str(bundle_dir), "--input",
            str(inputs), "--output", str(output), "--actors", str(actors), "--batch-size", "512"]


def run_all(args, work: Path, report: dict, s3) -> None:
    from clfsys import storage
    from clfsys.images import is_image_path

    delayed = None
    if s3 is not None:  # S3's first-byte latency for small objects is of the order of 20 ms
        from infra import DelayProxy

        delayed = DelayProxy(int(s3.endpoint.rsplit(":", 1)[1]), DELAY_MS / 1000)

    for name, (folder, bundle_dir) in prepare(work, args.photo_copies).items():
        if args.only and not name.startswith(f"({args.only})"):
            continue
        files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and is_image_path(p))
        if s3 is not None and "reads alone" not in report:
            report["reads alone"] = reads_alone(s3, files[:2000])
        listing = work / f"files_{folder.name}.txt"
        listing.write_text("\n".join(files))
        warm_page_cache(files)
        variants = {}
        for actors in (1, 2):
            out = work / f"labels_{folder.name}_{actors}"
            variants[f"clfsys label, {actors} actor{'s' if actors > 1 else ''}"] = (
                label_command(bundle_dir, folder, out, actors), out)
        out = work / f"labels_{folder.name}_running"
        variants[RUNNING] = (label_command(bundle_dir, folder, out), out)
        few = work / f"few_{folder.name}"  # the running node's earlier job
        shutil.rmtree(few, ignore_errors=True)
        few.mkdir()
        for i, path in enumerate(files[:512]):
            shutil.copy(path, few / f"{i}{Path(path).suffix}")
        warm_up = label_command(bundle_dir, few, few / "labels")
        if s3 is not None:
            inputs = s3.uri("inputs", folder.name)
            started = time.perf_counter()
            storage.copy_tree(folder, inputs)
            print(f"uploaded {len(files)} files to {inputs} in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            variants["clfsys label, 1 actor, S3 in and out"] = (
                label_command(bundle_dir, inputs, "S3_OUTPUT"), "s3")
            variants[f"... the same, {DELAY_MS} ms added each way"] = (
                variants["clfsys label, 1 actor, S3 in and out"][0], "s3-delayed")
        for kind, label in (("tfdata", "single process: tf.data + predict(1024)"),
                            ("loop", f"tutorial per-image loop ({args.sample} images)")):
            variants[label] = ([sys.executable, "benchmarks/label.py", "baseline", kind,
                                str(bundle_dir), str(listing), str(args.sample)], None)
        if args.daft_python:
            variants[DAFT] = ([args.daft_python, "benchmarks/label.py", "daft", str(bundle_dir),
                               str(folder), str(work / f"daft_{folder.name}")], None)
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for repeat in range(args.repeats):  # interleaved, so drifts hit every variant alike
            for variant, (command, out) in variants.items():
                if variant.startswith("tutorial") and repeat:
                    continue  # a slow sample; once is enough
                env, watch = None, None
                if out in ("s3", "s3-delayed"):  # a new output location each run
                    watch = {"S3 server": s3.process.pid, "proxy": os.getpid()}
                    command = [s3.uri("labels", f"{folder.name}-{out}-{repeat}")
                               if c == "S3_OUTPUT" else c for c in command]
                    if out == "s3-delayed":
                        env = {**os.environ, "AWS_ENDPOINT_URL": delayed.url}
                elif out is not None:
                    shutil.rmtree(out, ignore_errors=True)
                if variant == RUNNING:
                    shutil.rmtree(few / "labels", ignore_errors=True)
                    m = on_a_running_node(command, warm_up)
                else:
                    m = measure(command, env, watch)
                result = m["result"]
                if watch:
                    print(f"{variant}: {m['wall_s']:.1f} s; CPU s meanwhile: "
                          + ", ".join(f"{k} {v:.1f}" for k, v in m["cpu_s"].items())
                          + " (the proxy: this process, which relays only the delayed run)",
                          flush=True)
                if out is not None:
                    assert result["files"] == len(files) and result["missing"] == 0
                    result = {"images": result["files"], "images_per_s": result["files_per_s"]}
                elif not variant.startswith("tutorial"):
                    assert result["images"] == len(files), (variant, result)
                runs[variant].append({"images": result["images"], "wall_s": m["wall_s"],
                                      "in_run_images_per_s": result["images_per_s"],
                                      "peak_mb": m["peak_mb"], "peak_pss_mb": m["peak_pss_mb"]})
        rows = {}
        for variant, measured in runs.items():
            median = sorted(measured, key=lambda r: r["wall_s"])[len(measured) // 2]
            rows[variant] = {**median, "images_per_s": median["images"] / median["wall_s"],
                             "peak_mb": max(r["peak_mb"] for r in measured),
                             "peak_pss_mb": max(r["peak_pss_mb"] for r in measured),
                             "walls_s": [round(r["wall_s"], 1) for r in measured]}
        report[name] = rows
        single = rows["single process: tf.data + predict(1024)"]["images_per_s"]
        loop = rows[f"tutorial per-image loop ({args.sample} images)"]["in_run_images_per_s"]
        print(f"\n## {name}: {len(files)} files")
        print(f"| {'variant':<42} | images | wall s | images/s end to end | images/s in run "
              "| vs single process | vs per-image loop | peak RSS MB | peak PSS MB |")
        print("|" + "|".join("-" * n for n in (44, 8, 8, 21, 17, 19, 19, 13, 13)) + "|")
        for variant, r in rows.items():
            print(f"| {variant:<42} | {r['images']:>6} | {r['wall_s']:>6.1f} | "
                  f"{r['images_per_s']:>19.0f} | {r['in_run_images_per_s']:>15.0f} | "
                  f"{r['images_per_s'] / single:>16.2f}x | {r['images_per_s'] / loop:>16.1f}x "
                  f"| {r['peak_mb']:>11.0f} | {r['peak_pss_mb']:>11.0f} |")
        one, two = (rows[k]["images_per_s"] for k in list(rows)[:2])
        print(f"1 -> 2 actors: {one:.0f} -> {two:.0f} images/s end to end ({two / one:.2f}x). "
              "Ratios use end-to-end rates, except the per-image loop's own (in run, on a sample).")
        running = rows[RUNNING]["images_per_s"]
        print(f"On a Ray node already running vs starting Ray itself, 1 actor: {running:.0f} vs "
              f"{one:.0f} images/s end to end ({running / one:.2f}x); vs the single process "
              f"{running / single:.2f}x")
        if DAFT in rows:
            daft = rows[DAFT]["images_per_s"]
            print(f"clfsys (best of 1 and 2 actors) vs Daft: {max(one, two):.0f} vs {daft:.0f} "
                  f"images/s end to end ({max(one, two) / daft:.2f}x)")
        if s3 is not None:
            slow = rows[f"... the same, {DELAY_MS} ms added each way"]["images_per_s"]
            fast = rows["clfsys label, 1 actor, S3 in and out"]["images_per_s"]
            print(f"S3 with {2 * DELAY_MS} ms round trips vs without: {slow:.0f} vs {fast:.0f} "
                  f"images/s end to end ({slow / fast:.2f}x); at most "
                  f"{delayed.most_in_flight} GETs in flight at once")
            remote = rows["clfsys label, 1 actor, S3 in and out"]
            local = rows["clfsys label, 1 actor"]
            print(f"S3 in and out vs local files, 1 actor: {remote['images_per_s']:.0f} vs "
                  f"{one:.0f} images/s end to end ({remote['images_per_s'] / one:.2f}x); in run "
                  f"{remote['in_run_images_per_s']:.0f} vs {local['in_run_images_per_s']:.0f} "
                  f"({remote['in_run_images_per_s'] / local['in_run_images_per_s']:.2f}x)")
        print(f"Median of {args.repeats} interleaved runs per variant (the loop: one); walls s: "
              + "; ".join(f"{v}: {r['walls_s']}" for v, r in rows.items()))


if __name__ == "__main__":
    main()
