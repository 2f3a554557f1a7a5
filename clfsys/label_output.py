"""The output of `clfsys label`: a Parquet dataset at the location the user named, written by
the driver one block at a time, atomically, and counted at the end from what is really there:
every input exactly once, the summary, the list of unread files, and the review report."""

from __future__ import annotations

import io
import json
import sys
import time
import uuid
from collections import Counter, deque
from typing import Any

import numpy as np

from clfsys import bundle, images, storage
from clfsys.errors import DataError, IncompleteError

SUMMARY_FILE = "_summary.json"
UNREAD_FILE = "_unread.json"
REPORT_FILE = "_report.html"


def schema():
    """The output table's Arrow schema (fixed, so every Parquet file agrees)."""
    import pyarrow as pa

    return pa.schema([
        ("path", pa.string()), ("label", pa.string()), ("label_index", pa.int64()),
        ("confidence", pa.float64()),
        ("top_k", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
        ("needs_review", pa.bool_()), ("error", pa.string()), ("model_id", pa.string()),
    ])


def output_files(output: str) -> list[str]:
    """The Parquet files of an output dataset (report files start with '_' and are skipped)."""
    return [f for f in storage.list_files(output, recursive=True)
            if f.endswith(".parquet") and not storage.name(f).startswith(("_", "."))]


def read_output(output: str, columns: list[str]):
    """Columns of every row in the output, read back from its location (a pyarrow Table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for file in output_files(output):
        fs, path = storage.resolve(file)
        try:
            tables.append(pq.read_table(path, filesystem=fs, columns=columns))
        except OSError as exc:
            if "Parquet" in str(exc) or "magic" in str(exc):
                raise DataError(f"{file} is not a readable Parquet file ({exc}); remove it "
                                "and run again with --resume") from None
            raise storage.StorageError(f"{file}: cannot read: {exc}") from None
    if not tables:
        return pa.table({c: pa.array([], type=schema().field(c).type) for c in columns})
    return pa.concat_tables(tables)


class Writer:
    """Writes each block of rows to `output` as one Parquet file of its own run, atomically
    (label.py makes blocks of at most BATCHES_PER_BLOCK batches, so a killed run loses little).

    Up to IN_FLIGHT files are written at once, on threads: on an object store each write waits
    a round trip, and one after another they would cap every node's labelling at one driver's
    round trips (through 10 ms each way, 27 ms a file: 75,000 rows/s in blocks of 2,048).
    `written` counts the rows of files written whole; `write` raises the StorageError of an
    earlier block's write, `close` waits for every write and raises the first failure."""

    IN_FLIGHT = 8

    def __init__(self, output: str):
        from concurrent.futures import ThreadPoolExecutor

        self.output = output
        self.run = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.written = 0
        self.files = 0
        self._pool = ThreadPoolExecutor(self.IN_FLIGHT, thread_name_prefix="label-write")
        self._pending: deque = deque()  # (future, rows), in the order they were written

    def write(self, table) -> None:
        import pyarrow.parquet as pq

        if not table.num_rows:
            return
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        location = storage.join(self.output, f"part-{self.run}-{self.files:05d}.parquet")
        self.files += 1
        data = buffer.getvalue()
        self._pending.append((self._pool.submit(
            storage.retrying, lambda: storage.write_bytes(location, data)), table.num_rows))
        while self._pending and (len(self._pending) > self.IN_FLIGHT or
                                 self._pending[0][0].done()):
            self._settle()

    def close(self) -> None:
        """Wait for every write; raise the first that failed (after all have ended)."""
        from concurrent.futures import wait

        wait([future for future, _ in self._pending])
        self._pool.shutdown()
        failure = None
        while self._pending:
            try:
                self._settle()
            except storage.StorageError as exc:
                failure = failure or exc
        if failure:
            raise failure

    def _settle(self) -> None:
        future, rows = self._pending.popleft()
        future.result()
        self.written += rows


def check_same_model(output: str, ids: set[str], model_id: str) -> None:
    others = sorted(i for i in ids if i and i != model_id)
    if others:
        raise DataError(f"--output {output} holds labels of model_id {others[0]}, this run's "
                        f"model is {model_id}; resume with the same model or choose a new "
                        "output, so two models' labels are never mixed")


def finish(out: str, paths: list[str], wall_s: float, processed: int, unread: dict[str, str],
            failure: str | None, found: bundle.Bundle) -> dict[str, Any]:
    rate = processed / wall_s if wall_s > 0 else 0.0
    try:
        table = read_output(out, ["path", "label", "confidence", "error", "needs_review"])
    except storage.StorageError as exc:
        result = {"output": out, "files": len(paths), "unread": len(unread),
                  "wall_s": round(wall_s, 1), "ok": False}
        raise IncompleteError(f"{failure + '; ' if failure else ''}cannot read the output back "
                              f"({exc}); run again with --resume when storage is back",
                              result) from None
    rows = table.to_pandas()
    summary = summarize(rows, paths)
    summary.update({"output": out, "model_id": found.model_id, "unread": len(unread),
                    "files_per_s": round(rate, 1), "wall_s": round(wall_s, 1)})
    problems = []
    if unread:
        reasons = Counter(reason(r) for r in unread.values()).most_common(3)
        problems.append(f"{len(unread)} files could not be read ("
                        + "; ".join(f"{n}x {r}" for r, n in reasons) + ")")
    missing_other = summary["missing"] - len(unread)
    if missing_other > 0:
        problems.append(f"{missing_other} files have no row in {out}"
                        + (f" ({failure})" if failure else ""))
    if summary["duplicates"]:
        problems.append(f"{summary['duplicates']} files have more than one row (two runs "
                        "wrote to this output at once?)")
    summary["ok"] = not problems
    print(f"\n== labelled {summary['labelled']} of {len(paths)} files; errors: "
          f"{summary['errors'] or 'none'}; needs review: {summary['needs_review']}; unread: "
          f"{len(unread)}; {processed} files in {wall_s:.1f} s ({rate:.0f} files/s); "
          f"output: {out}", file=sys.stderr)
    _write_reports(out, summary, unread, rows, found)
    if problems:
        raise IncompleteError("; ".join(problems) + f"; unread files are listed in "
                              f"{storage.join(out, UNREAD_FILE)}; `--resume` labels exactly "
                              "the files missing from the output", summary)
    return summary


def reason(message: str) -> str:
    """A read failure without its file name, to group them."""
    return message.split(": ", 1)[-1][:120]


def summarize(rows, paths: list[str]) -> dict[str, Any]:
    """Counts of the output rows (a DataFrame read back from storage) that belong to `paths`."""
    wanted = set(paths)
    frame = rows[np.array([p in wanted for p in rows["path"]], dtype=bool)]  # isin: 8x slower
    errors = Counter(str(e).split(":")[0] for e in frame["error"].dropna())
    labelled = frame[frame["error"].isna()]
    return {"files": len(paths), "rows": int(len(frame)), "labelled": int(len(labelled)),
            "errors": dict(errors),
            "needs_review": int(frame["needs_review"].fillna(False).astype(bool).sum()),
            "missing": len(wanted - set(frame["path"])),
            "duplicates": int(frame["path"].duplicated().sum()),
            "per_class": {str(k): int(v) for k, v in
                          labelled["label"].value_counts().sort_index().items()}}


def _write_reports(out: str, summary: dict[str, Any], unread: dict[str, str], rows,
                   found: bundle.Bundle) -> None:
    """_summary.json, _unread.json and _report.html next to the Parquet files."""
    from clfsys import report

    try:
        storage.write_text(storage.join(out, SUMMARY_FILE), json.dumps(summary, indent=1))
        if unread:
            storage.write_text(storage.join(out, UNREAD_FILE), json.dumps(unread, indent=1))
        else:
            storage.delete(storage.join(out, UNREAD_FILE))
        page = report.label_report(summary, rows, _thumbnail, found.class_names)
        storage.write_text(storage.join(out, REPORT_FILE), page)
        print(f"report: {storage.join(out, REPORT_FILE)}", file=sys.stderr)
    except storage.StorageError as exc:
        print(f"clfsys: could not write the report files: {exc}", file=sys.stderr)


def _thumbnail(path: str) -> np.ndarray | None:
    try:
        return images.decode(storage.read_bytes(path), (96, 96), "rgb")
    except (storage.StorageError, images.ImageError):
        return None
