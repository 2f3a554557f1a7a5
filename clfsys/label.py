"""Bulk labelling with Ray Data: image files -> decode -> Predictor actors -> Parquet.

Every input file gets exactly one output row. A file that cannot be read or decoded gets a row
whose `error` says why ("empty file", "not an image", "truncated", "too many pixels",
"unreadable"); no file is lost and none stops the job. Files are listed by the driver (paths
only); bytes are read and decoded inside the pipeline, one try/except per file, so the
directory is never held in memory.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clfsys import images
from clfsys.bundle import load as load_bundle
from clfsys.errors import DataError

BATCHES_PER_BLOCK = 8
"""Input blocks (paths) hold at most this many batches: fewer, larger decode tasks..."""
BLOCKS_PER_CPU = 4
"""...but at least this many blocks per cluster CPU (never under one batch each), so that a few
thousand large photos still spread over every core and stream into the actors early."""
TASK_CPUS = 0.75
ACTOR_CPUS = 0.25
"""Logical CPU shares, i.e. how many of each run at once. Decoding is the heavy part (~1 ms per
photo); a CPU Predictor actor needs a fraction of that. On a 2-CPU node this runs two tasks
beside the actor; on larger nodes tasks overcommit cores by at most a third. Decode and Parquet
write tasks ask for the same share, so the worker processes that Ray starts for the one serve
the other (2 processes instead of 5 on 2 CPUs, each ~1 CPU-second to start). Different shares
for tasks and the actor also stop Ray Data fusing decoding into the actor's process."""


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _remote_listing(pattern: str) -> list[str]:
    import pyarrow.fs as pafs

    has_glob = any(c in pattern for c in "*?[")
    base = pattern
    if has_glob:
        base = pattern[: min(pattern.index(c) for c in "*?[" if c in pattern)].rsplit("/", 1)[0]
    fs, root = pafs.FileSystem.from_uri(base)
    scheme = pattern.split("://", 1)[0]
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [pattern]
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"input not found: {pattern}")
    found = [f"{scheme}://{i.path}" for i in fs.get_file_info(pafs.FileSelector(root,
                                                                               recursive=True))
             if i.type == pafs.FileType.File]
    return [f for f in found if fnmatch.fnmatch(f, pattern)] if has_glob else found


def list_inputs(inputs: list[str]) -> list[str]:
    """Expand directories (recursively), globs and files into image paths, sorted, unique."""
    paths: list[str] = []
    for item in inputs:
        if _is_uri(item):
            candidates = _remote_listing(item)
        elif any(c in item for c in "*?["):
            candidates = sorted(glob.glob(item, recursive=True))
            if not candidates:
                raise DataError(f"no files match input pattern: {item}")
            candidates = [c for p in candidates for c in _walk(p)]
        else:
            item = item.removeprefix("file://")
            if not os.path.exists(item):
                raise DataError(f"input not found: {item}")
            candidates = _walk(item)
        paths += [p for p in candidates if images.is_image_path(p)]
    unique = sorted(set(os.path.abspath(p) if not _is_uri(p) else p for p in paths))
    if not unique:
        raise DataError(f"no image files ({', '.join(sorted(images.IMAGE_EXTENSIONS))}) in "
                        f"{', '.join(inputs)}")
    return unique


def _walk(path: str) -> list[str]:
    if os.path.isdir(path):
        return [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    return [path]


@functools.lru_cache(maxsize=64)
def _filesystem(root: str):
    """The pyarrow filesystem of `scheme://authority/` and its path there, made once per process:
    making one can cost network round trips (S3 looks up the bucket's region and credentials)."""
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(root)
    return fs, base.rstrip("/")


def _read_uri(uri: str) -> bytes:
    scheme, rest = uri.split("://", 1)
    authority, _, key = rest.partition("/")
    try:
        fs, base = _filesystem(f"{scheme}://{authority}/")
        with fs.open_input_file(f"{base}/{key}") as handle:
            return handle.read()
    except OSError as exc:
        raise images.ImageError(images.UNREADABLE, str(exc)) from None


def _read(path: str) -> bytes:
    return _read_uri(path) if _is_uri(path) else images.read_bytes(path)


def decode_batch(batch: dict[str, np.ndarray], size: tuple[int, int], color_mode: str,
                 max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data stage: read and decode each file; a failure becomes that row's `error`."""
    channels = 1 if color_mode == "grayscale" else 3
    paths = batch["path"]
    out = np.zeros((len(paths), *size, channels), dtype=np.uint8)
    errors = np.full(len(paths), None, dtype=object)
    for i, path in enumerate(paths):
        try:
            out[i] = images.decode(_read(str(path)), size, color_mode, max_pixels=max_pixels)
        except images.ImageError as exc:
            errors[i] = exc.kind
        except Exception as exc:  # never let one file kill the job
            errors[i] = f"{images.UNREADABLE}: {type(exc).__name__}"
    return {"path": paths, "image": out, "error": errors}


class LabelActor:
    """Ray Data actor: hosts one Predictor and labels decoded batches."""

    def __init__(self, bundle_path: str, top_k: int, min_confidence: float):
        from clfsys.predict import Predictor

        self.predictor = Predictor(bundle_path, top_k=top_k)
        self.min_confidence = min_confidence

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        # An all-null error column can come back from Arrow as NaNs: only strings are errors.
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        n = len(errors)
        ok = np.array([e is None for e in errors], dtype=bool)
        label: list[Any] = [None] * n
        index: list[Any] = [None] * n
        confidence: list[Any] = [None] * n
        top_k: list[Any] = [None] * n
        review: list[Any] = [None] * n
        if ok.any():
            result = self.predictor.predict(batch["image"][ok])
            for j, row in enumerate(np.flatnonzero(ok)):
                label[row] = str(result["label"][j])
                index[row] = int(result["label_index"][j])
                confidence[row] = float(result["confidence"][j])
                review[row] = confidence[row] < self.min_confidence
                top_k[row] = self.predictor.top_k_records(result, j)
        return pa.Table.from_pydict({
            "path": [str(p) for p in batch["path"]], "label": label, "label_index": index,
            "confidence": confidence, "top_k": top_k, "needs_review": review, "error": errors,
            "model_id": [self.predictor.model_id] * n,
        }, schema=schema())


def schema():
    """The output table's Arrow schema (fixed, so every Parquet file agrees)."""
    import pyarrow as pa

    return pa.schema([
        ("path", pa.string()), ("label", pa.string()), ("label_index", pa.int64()),
        ("confidence", pa.float64()),
        ("top_k", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
        ("needs_review", pa.bool_()), ("error", pa.string()), ("model_id", pa.string()),
    ])


def _parquet_files(output: Path) -> list[Path]:
    return sorted(p for p in output.rglob("*.parquet") if p.is_file())


def done_paths(output: Path) -> set[str]:
    """Paths already labelled in `output`; unreadable (partly written) files are removed, so
    their rows are produced again."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for file in _parquet_files(output):
        try:
            done.update(pq.read_table(file, columns=["path"]).column("path").to_pylist())
        except Exception as exc:
            print(f"removing incomplete output file {file} ({type(exc).__name__}); its rows "
                  "will be labelled again", file=sys.stderr)
            file.unlink()
    return done


def drop_duplicates(output: Path) -> int:
    """Keep the first row of each path (oldest file first); returns the rows removed.

    Ray workers of a killed run can finish writing a file a few seconds after its driver died;
    a run resumed in that window labels those files again.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    seen: set[str] = set()
    removed = 0
    for file in sorted(_parquet_files(output), key=lambda f: f.stat().st_mtime):
        keep = []
        for path in pq.read_table(file, columns=["path"]).column("path").to_pylist():
            keep.append(path not in seen)
            seen.add(path)
        if all(keep):
            continue
        removed += keep.count(False)
        kept = pq.read_table(file).filter(pa.array(keep))
        if kept.num_rows:
            partial = file.with_name(file.name + ".partial")
            pq.write_table(kept, partial)
            os.replace(partial, file)
        else:
            file.unlink()
    if removed:
        print(f"removed {removed} duplicate rows (a killed run's workers finished writing "
              "them after this run had listed what was done)", file=sys.stderr)
    return removed


@dataclass
class LabelOptions:
    batch_size: int = 256
    actors: int = 1
    num_gpus: float = 0.0
    top_k: int = 3
    min_confidence: float = 0.5
    max_pixels: int = images.DEFAULT_MAX_PIXELS

    def check(self) -> None:
        for name, ok in (("--batch-size", self.batch_size > 0), ("--actors", self.actors > 0),
                         ("--num-gpus", self.num_gpus >= 0), ("--top-k", self.top_k > 0),
                         ("--min-confidence", 0 <= self.min_confidence <= 1)):
            if not ok:
                raise DataError(f"{name} has a bad value: {getattr(self, _attr(name))!r}")


def _attr(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def run_label(bundle_path: str, inputs: list[str], output: str, *, resume: bool = False,
              options: LabelOptions | None = None) -> dict[str, Any]:
    """Label every image file under `inputs` into a Parquet dataset at `output`."""
    from clfsys.cluster import init_ray

    options = options or LabelOptions()
    options.check()
    found = load_bundle(bundle_path)  # fail fast on a missing or foreign bundle
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise DataError(f"--output {out} exists and is not a directory")
    existing = _parquet_files(out) if out.is_dir() else []
    if existing and not resume:
        raise DataError(f"--output {out} already holds {len(existing)} Parquet files; pass "
                        "--resume to label only the files not yet in it, or choose a new folder")
    found.check_file()  # the actors load the model; the driver needs no TensorFlow
    paths = list_inputs(inputs)
    done = done_paths(out) if resume and out.is_dir() else set()
    todo = [p for p in paths if p not in done]
    print(f"{len(paths)} image files, {len(done & set(paths))} already labelled, "
          f"{len(todo)} to label", file=sys.stderr)
    started = time.perf_counter()
    if todo:
        init_ray()
        out.mkdir(parents=True, exist_ok=True)
        _pipeline(todo, found, options).write_parquet(
            str(out.resolve()), ray_remote_args={"num_cpus": TASK_CPUS})
    wall = time.perf_counter() - started
    if resume:
        drop_duplicates(out)
    return summarize(out, paths, wall, len(todo))


def _pipeline(paths: list[str], found, options: LabelOptions):
    """paths -> decode tasks -> Predictor actors: a Ray Dataset of output rows."""
    import ray

    # Ray Data reserves a share of the cluster for each operator; on a small cluster that
    # leaves one decode task running while cores sit idle.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    ds = ray.data.from_items([{"path": p} for p in paths],
                             override_num_blocks=num_blocks(len(paths), options.batch_size,
                                                            ray.cluster_resources().get("CPU", 1)))
    ds = ds.map_batches(decode_batch, batch_format="numpy", batch_size=options.batch_size,
                        num_cpus=TASK_CPUS,
                        fn_kwargs={"size": found.image_size, "color_mode": found.color_mode,
                                   "max_pixels": options.max_pixels})
    return ds.map_batches(
        LabelActor, batch_format="numpy", batch_size=options.batch_size,
        fn_constructor_kwargs={"bundle_path": str(found.path.resolve()), "top_k": options.top_k,
                               "min_confidence": options.min_confidence},
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_gpus=options.num_gpus or None, num_cpus=None if options.num_gpus else ACTOR_CPUS)


def num_blocks(files: int, batch_size: int, cpus: float) -> int:
    """How many blocks to split the file list into (see BATCHES_PER_BLOCK, BLOCKS_PER_CPU)."""
    by_size = -(-files // (BATCHES_PER_BLOCK * batch_size))
    spread = min(int(BLOCKS_PER_CPU * cpus), -(-files // batch_size))
    return max(1, by_size, spread)


def summarize(out: Path, paths: list[str], wall_s: float, processed: int) -> dict[str, Any]:
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["path", "error", "needs_review"]).to_pandas()
    table = table[table["path"].isin(set(paths))]
    errors = Counter(str(e).split(":")[0] for e in table["error"].dropna())
    labelled = int(table["error"].isna().sum())
    review = int(table["needs_review"].fillna(False).astype(bool).sum())
    rate = processed / wall_s if wall_s > 0 else 0.0
    print(f"\n== labelled {labelled} of {len(paths)} files; errors: "
          f"{dict(errors) or 'none'}; needs review: {review}; "
          f"{processed} files in {wall_s:.1f} s ({rate:.0f} files/s); output: {out}",
          file=sys.stderr)
    missing = len(set(paths) - set(table["path"]))
    return {"output": str(out), "files": len(paths), "labelled": labelled,
            "errors": dict(errors), "needs_review": review, "missing": missing,
            "duplicates": int(table["path"].duplicated().sum()),
            "files_per_s": round(rate, 1), "wall_s": round(wall_s, 1)}
