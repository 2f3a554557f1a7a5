"""Bulk labelling with Ray Data: image files -> decode tasks -> Predictor actors -> Parquet.

Every input file ends as exactly one output row, or the job says it did not. A file whose bytes
are bad gets a row whose `error` says why ("empty file", "not an image", "truncated", "too many
pixels"). A file that could not be *read* (I/O error, timeout, permission, missing on the node
that tried) is not a bad file: reads are retried with backoff, and a file still unread gets no
row, is listed in `_unread.json`, and makes the job exit non-zero; `--resume` reads exactly
those files again.

Where things run: decoding reads the inputs, so inputs that are local paths are decoded on the
driver's node (the only node that has them) unless declared shared (`--shared-inputs`, an NFS
mount); URIs are decoded anywhere. Actors get decoded pixels and the bundle (`bundle.Portable`)
through Ray, so they run on any node. The driver writes every Parquet file itself, through
`storage`, to the location the user named, and counts the rows it reads back from there.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from clfsys import bundle, images, label_output, storage
from clfsys.errors import DataError, first_line
from clfsys.options import flag, option

BATCHES_PER_BLOCK = 8
"""Input blocks (paths) hold at most this many batches: fewer, larger decode tasks..."""
BLOCKS_PER_CPU = 4
"""...but at least this many blocks per cluster CPU (never under one batch each), so that a few
thousand large photos still spread over every core and stream into the actors early."""
TASK_CPUS = 0.75
ACTOR_CPUS = 0.25
"""Logical CPU shares, i.e. how many of each run at once. Decoding is the heavy part (~1 ms per
photo); a CPU Predictor actor needs a fraction of that. On a 2-CPU node this runs two tasks
beside the actor; on larger nodes tasks overcommit cores by at most a third. Different shares
for tasks and the actor also stop Ray Data fusing decoding into the actor's process."""
READ_ATTEMPTS = 3
READS_IN_FLIGHT = 64
"""Files one decode task reads at once from an object store (`storage.read_many`; at most
objectstore.THREADS). Each GET waits a round trip (tens of ms on S3 for a small object): read
one after another, 2,000 PNGs through a proxy adding 10 ms each way took 60 s, against 16 s
without it (issue 24). With 32, two decode tasks kept 20-30 GETs in flight on average, and
40,000 PNGs S3 to S3 through 10 ms each way took 38.0-39.4 s; with 64, 31.8 s, and with 128
(and 128 threads) 31.6 s. Local files are read one by one."""


class ReadBreaker:
    """The storage-outage breaker of one worker process (it outlives a batch): after
    `give_up_after` files in a row failed every attempt (storage is down; files not found do not
    count), the process tries one file, once, every `probe_every_s` seconds and reports the
    others unread without waiting out their timeouts; the first file read again closes it.

    It also sets how many reads go out at once (`window`): one after a failure, doubling after
    each window read whole, up to `most`. Failing reads that go out together cost far more
    than one (against a stopped S3 server, one read failed after 19 s, but 32 at once took
    up to 75 s), so an outage meets one read at a time, as the breaker needs."""

    def __init__(self, give_up_after: int = 2, probe_every_s: float = 10.0,
                 most: int = READS_IN_FLIGHT):
        self.give_up_after, self.probe_every_s, self.most = give_up_after, probe_every_s, most
        # Never probed: the first probe is due at once. (0.0 would not do: time.monotonic()
        # counts from boot, so on a machine up less than probe_every_s no probe was due.)
        self.in_a_row, self.last, self.probed_at = 0, "", -math.inf
        self.window = 1

    @property
    def open(self) -> bool:
        return self.in_a_row >= self.give_up_after

    def may_probe(self) -> bool:
        if time.monotonic() - self.probed_at < self.probe_every_s:
            return False
        self.probed_at = time.monotonic()
        return True

    def record(self, failure: storage.StorageError | None) -> None:
        if failure is None:
            self.in_a_row = 0
        elif not failure.not_found:  # a missing file says nothing about the storage
            self.in_a_row += 1
            self.last = label_output.reason(str(failure))
            self.window = 1

    def widen(self) -> None:
        """A window came back without a storage failure: let the next one be twice as wide."""
        if not self.in_a_row:
            self.window = min(self.most, self.window * 2)


_breaker = ReadBreaker()
def read_files(paths: list[str], breaker: ReadBreaker) -> Iterator[bytes | str]:
    """Each file's bytes in turn, or why it was not read (after READ_ATTEMPTS with backoff, or
    not tried while `breaker` is open); from an object store `breaker.window` at a time (at
    most READS_IN_FLIGHT, so at most that many files are held at once)."""
    remote = bool(paths) and storage.is_uri(paths[0])
    start = 0
    while start < len(paths):
        window = paths[start:start + (breaker.window if remote else 1)]
        start += len(window)
        if breaker.open:
            if not breaker.may_probe():
                yield from (f"{p}: not tried, storage failing ({breaker.last})" for p in window)
                continue
            window, (probe,) = window[1:], storage.read_many(window[:1], attempts=1)
            breaker.record(probe if isinstance(probe, storage.StorageError) else None)
            yield str(probe) if isinstance(probe, storage.StorageError) else probe
            if breaker.open or not window:
                yield from (f"{p}: not tried, storage failing ({breaker.last})" for p in window)
                continue
        for outcome in storage.read_many(window, attempts=READ_ATTEMPTS):
            failed = isinstance(outcome, storage.StorageError)
            breaker.record(outcome if failed else None)
            yield str(outcome) if failed else outcome
        breaker.widen()


def list_inputs(inputs: list[str]) -> list[str]:
    """Expand directories (recursively), globs and files into image locations, sorted, unique."""
    paths: list[str] = []
    for item in inputs:
        try:
            candidates = storage.expand(item)
        except storage.StorageError as exc:
            raise DataError(f"input not found: {item}" if exc.not_found else str(exc)) from None
        paths += [p for p in candidates if images.is_image_path(p)]
    unique = sorted(set(paths))
    if not unique:
        raise DataError(f"no image files ({', '.join(sorted(images.IMAGE_EXTENSIONS))}) in "
                        f"{', '.join(inputs)}")
    return unique


def decode_batch(batch: dict[str, np.ndarray], size: tuple[int, int], color_mode: str,
                 max_pixels: int, resize: str = "stretch") -> dict[str, np.ndarray]:
    """Ray Data stage: read and decode each file. A bad file becomes that row's `error`; a file
    that could not be read, after retries, that row's `read_error`."""
    channels = 1 if color_mode == "grayscale" else 3
    paths = batch["path"]
    out = np.zeros((len(paths), *size, channels), dtype=np.uint8)
    errors = np.full(len(paths), None, dtype=object)
    read_errors = np.full(len(paths), None, dtype=object)
    for i, data in enumerate(read_files([str(p) for p in paths], _breaker)):
        if isinstance(data, str):
            read_errors[i] = data
            continue
        try:
            out[i] = images.decode(data, size, color_mode, max_pixels=max_pixels,
                                   resize=resize)
        except images.ImageError as exc:  # the file's bytes; anything else is a bug: raised
            errors[i] = exc.kind
    return {"path": paths, "image": out, "error": errors, "read_error": read_errors}


class LabelActor:
    """Ray Data actor: hosts one Predictor and labels decoded batches."""

    def __init__(self, source: bundle.Portable, top_k: int, min_confidence: float):
        from clfsys.predict import Predictor

        self.predictor = Predictor(source.open(), top_k=top_k)
        self.predictor.warm_up()  # trace the model now, while the decode tasks run
        self.min_confidence = min_confidence

    def __call__(self, batch: dict[str, np.ndarray]):
        """The batch's output rows as one Arrow table, built column by column from the model's
        arrays (no Python object per row)."""
        import pyarrow as pa

        # An all-null string column can come back from Arrow as NaNs: only strings count.
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        read_errors = [e if isinstance(e, str) else None for e in batch["read_error"]]
        n = len(errors)
        ok = np.array([e is None and r is None for e, r in zip(errors, read_errors,
                                                                strict=True)], dtype=bool)
        result = self.predictor.predict(batch["image"][ok])
        k = result["top_k_index"].shape[1]  # (0, top_k) when no row decoded
        index = np.zeros(n, dtype=np.int64)
        index[ok] = result["label_index"]
        confidence = np.zeros(n)
        confidence[ok] = result["confidence"]
        names = pa.array(self.predictor.class_names, pa.string())
        top_k = pa.ListArray.from_arrays(
            pa.array(np.cumsum(np.r_[0, np.where(ok, k, 0)]), pa.int32()),
            pa.StructArray.from_arrays(
                [names.take(pa.array(result["top_k_index"].ravel())),
                 pa.array(result["top_k_score"].ravel(), pa.float64())],
                names=["label", "score"]),
            mask=pa.array(~ok))
        return pa.Table.from_arrays([
            pa.array([str(p) for p in batch["path"]], pa.string()),
            names.take(pa.array(index, mask=~ok)),
            pa.array(index, mask=~ok),
            pa.array(confidence, mask=~ok),
            top_k,
            pa.array(confidence < self.min_confidence, mask=~ok),
            pa.array(errors, pa.string()),
            pa.array([self.predictor.model_id] * n, pa.string()),
            pa.array(read_errors, pa.string()),
        ], schema=_pipeline_schema())


def _pipeline_schema():
    import pyarrow as pa

    return label_output.schema().append(pa.field("read_error", pa.string()))


@dataclass(frozen=True)
class LabelOptions:
    """Every `clfsys label` option (--batch-size is batch_size) with its default."""

    shared_inputs: bool = option(False, "local --input paths are mounted on every node (NFS): "
                                 "decode them on any node instead of this machine's only")
    batch_size: int = option(256, "images per decode batch and per model call")
    actors: int = option(1, "Predictor actors")
    num_gpus: float = option(0.0, "GPUs per actor")
    top_k: int = option(3, "classes in each row's top_k")
    min_confidence: float = option(0.5, "rows below this confidence get needs_review=true")
    max_pixels: int = option(images.DEFAULT_MAX_PIXELS, "an image with more pixels is an error "
                             "row, not decoded (decompression bombs)")

    def check(self) -> None:
        for name, ok in (("batch_size", self.batch_size > 0), ("actors", self.actors > 0),
                         ("num_gpus", self.num_gpus >= 0), ("top_k", self.top_k > 0),
                         ("min_confidence", 0 <= self.min_confidence <= 1),
                         ("max_pixels", self.max_pixels > 0)):
            if not ok:
                raise DataError(f"{flag(name)} has a bad value: {getattr(self, name)!r}")


def run_label(model: str, inputs: list[str], output: str, *, resume: bool = False,
              options: LabelOptions | None = None) -> dict[str, Any]:
    """Label every image file under `inputs` into a Parquet dataset at `output`.

    Raises IncompleteError (with the summary) when any file is not in the output at the end.
    """
    from clfsys.cluster import init_ray

    options = options or LabelOptions()
    options.check()
    found = bundle.load(model)  # fail fast on a missing or foreign bundle
    found.check_file()  # the actors load the model; the driver needs no TensorFlow
    out = storage.normalize(output)
    if storage.is_file(out):
        raise DataError(f"--output {output} exists and is not a directory")
    existing = label_output.output_files(out)
    if existing and not resume:
        raise DataError(f"--output {output} already holds {len(existing)} Parquet files; pass "
                        "--resume to label only the files not yet in it, or choose a new folder")
    done: set[str] = set()
    if existing:
        previous = label_output.read_output(out, ["path", "model_id"])
        label_output.check_same_model(output, set(previous.column("model_id").to_pylist()),
                                      found.model_id)
        done = set(previous.column("path").to_pylist())
    paths = list_inputs(inputs)
    todo = [p for p in paths if p not in done]
    print(f"{len(paths)} image files, {len(paths) - len(todo)} already labelled, "
          f"{len(todo)} to label", file=sys.stderr)
    started = time.perf_counter()
    unread: dict[str, str] = {}
    failure = None
    if todo:
        init_ray()
        storage.make_dirs(out)
        failure = _label(todo, found, options, out, unread)
    wall = time.perf_counter() - started
    return label_output.finish(out, paths, wall, len(todo), unread, failure, found)


def _label(todo: list[str], found: bundle.Bundle, options: LabelOptions, out: str,
           unread: dict[str, str]) -> str | None:
    """Run the pipeline, writing rows as they come; returns why it stopped early, if it did."""
    import pyarrow.compute as pc

    writer = label_output.Writer(out)
    columns = label_output.schema().names
    last_report = time.monotonic()
    seen = 0
    failure = None

    def report():
        print(f"labelled {seen}/{len(todo)} files, {writer.written} rows saved to {out}, "
              f"{len(unread)} unread", file=sys.stderr, flush=True)

    try:
        for table in _pipeline(todo, found, options).iter_batches(batch_size=None,
                                                                   batch_format="pyarrow"):
            failed = table.column("read_error").is_valid()
            for row in table.filter(failed).select(["path", "read_error"]).to_pylist():
                unread[row["path"]] = row["read_error"]
            writer.write(table.filter(pc.invert(failed)).select(columns))
            seen += table.num_rows
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                report()
        writer.close()
        report()  # the pipeline has drained: what follows is the count of the output
    except storage.StorageError as exc:
        failure = f"cannot write to {out}: {exc}"
    except Exception as exc:  # a lost node or actor past Ray's retries: keep what came back
        failure = f"the pipeline failed: {type(exc).__name__}: {first_line(exc)}"
    if failure:
        try:  # no write may still be going on when the output is counted
            writer.close()
        except storage.StorageError:
            pass  # the output's count says which files it left unwritten
        print(f"clfsys: {failure}", file=sys.stderr)
    return failure


def _pipeline(paths: list[str], found: bundle.Bundle, options: LabelOptions):
    """paths -> decode tasks -> Predictor actors: a Ray Dataset of output rows."""
    import ray

    # Ray Data reserves a share of the cluster for each operator; on a small cluster that
    # leaves one decode task running while cores sit idle.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    ds = ray.data.from_items([{"path": p} for p in paths],
                             override_num_blocks=num_blocks(len(paths), options.batch_size,
                                                            ray.cluster_resources().get("CPU", 1)))
    ds = ds.map_batches(decode_batch, batch_format="numpy", batch_size=options.batch_size,
                        num_cpus=TASK_CPUS, **_decode_placement(paths, options),
                        fn_kwargs={"size": found.image_size, "color_mode": found.color_mode,
                                   "max_pixels": options.max_pixels, "resize": found.resize})
    return ds.map_batches(
        LabelActor, batch_format="numpy", batch_size=options.batch_size,
        fn_constructor_kwargs={"source": bundle.portable(found), "top_k": options.top_k,
                               "min_confidence": options.min_confidence},
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_gpus=options.num_gpus or None, num_cpus=None if options.num_gpus else ACTOR_CPUS)


def _decode_placement(paths: list[str], options: LabelOptions) -> dict[str, Any]:
    """Decode tasks that read local paths run on the driver's node: no other node has them."""
    import ray

    if options.shared_inputs or not any(storage.is_local(p) for p in paths):
        return {}
    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == here), {})
    if node.get("Resources", {}).get("CPU", 0) < TASK_CPUS:
        raise DataError(
            "the inputs are local paths, which only this machine has, but its Ray node has no "
            "CPU for decode tasks; put them on shared storage (s3://, gs://) or, if every node "
            "mounts them at the same path, pass --shared-inputs")
    if len(ray.nodes()) > 1:
        print(f"inputs are local paths: decoding on this node ({here[:8]}) only; use a URI or "
              "--shared-inputs to decode on every node", file=sys.stderr)
    return {"label_selector": {"ray.io/node-id": here}}


def num_blocks(files: int, batch_size: int, cpus: float) -> int:
    """How many blocks to split the file list into (see BATCHES_PER_BLOCK, BLOCKS_PER_CPU)."""
    by_size = -(-files // (BATCHES_PER_BLOCK * batch_size))
    spread = min(int(BLOCKS_PER_CPU * cpus), -(-files // batch_size))
    return max(1, by_size, spread)


