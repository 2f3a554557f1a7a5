"""S3 objects through obstore: each read one GET (no HEAD first), each write one PUT, many at
once over pooled connections, reads retried with backoff, each on a thread of one pool per
process. storage.read_bytes, storage.read_many and storage.write_bytes use it where `target` can
take over pyarrow's configuration of a location; every other location goes through pyarrow.

obstore's blocking `get` releases the GIL while it waits. On threads it costs less CPU per object
than its asyncio API on an event loop, where every GET and every body woke the loop from obstore's
runtime: 4,000 small PNGs from a local SeaweedFS, 32 at once through `storage.read_many`, 196-204
us of the reading process's CPU per object and 3,290-3,326 objects/s, against 334-338 us and
2,352-2,381/s (this 2-core machine; the S3 server took 325-370 us per object either way)."""

from __future__ import annotations

import functools
import os
import re
from urllib.parse import urlsplit

from clfsys.errors import first_line
from clfsys.storage import StorageError, resolve, split_location

THREADS = 64
"""Reads in flight at once per process, at most (each decode task asks for a window of them)."""


def read_all(locations: list[str], targets: list, attempts: int,
             first_wait_s: float) -> list[bytes | StorageError]:
    """Each location's bytes (`targets` from `target`), or the StorageError of its last attempt,
    in order; up to THREADS requested at once."""
    if len(locations) == 1:  # no thread hop for one
        return [_get(locations[0], *targets[0], attempts, first_wait_s)]
    return list(_pool().map(lambda pair: _get(pair[0], *pair[1], attempts, first_wait_s),
                            zip(locations, targets, strict=True)))


def target(location: str):
    """(obstore store, key) for an s3:// location whose configuration obstore can take over
    from pyarrow's (keys, endpoint, region); None otherwise (then pyarrow reads it)."""
    if not location.startswith("s3://"):
        return None
    authority, path, query = split_location(location)
    try:
        store = s3_store(f"{authority}/{query}")
    except StorageError:  # pyarrow's read then says why
        return None
    return (store, path) if store is not None else None


@functools.lru_cache(maxsize=64)
def s3_store(root: str):
    try:
        import obstore.store
    except ImportError:
        return None
    fs, _bucket = resolve(root)
    if type(fs).__name__ != "S3FileSystem":
        return None
    options = fs.__reduce__()[1][0]  # what pyarrow made of the URI's query and the environment
    if options["anonymous"] or options["role_arn"] or options["proxy_options"]["host"] or \
            options["session_token"]:
        return None
    endpoint = options["endpoint_override"]
    if endpoint and "://" not in endpoint:
        endpoint = f"{options['scheme']}://{endpoint}"
    config = {"region": options["region"] or os.environ.get("AWS_REGION") or
              os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        config["endpoint"] = endpoint
    key = options["access_key"] or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = options["secret_key"] or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        config.update(access_key_id=key, secret_access_key=secret)
        if os.environ.get("AWS_SESSION_TOKEN"):
            config["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    bucket = urlsplit(root).netloc
    from datetime import timedelta

    return obstore.store.S3Store(
        bucket, config=config, retry_config={"max_retries": 0},  # retried here, as elsewhere
        client_options={"allow_http": endpoint.startswith("http://"),
                        "connect_timeout": timedelta(seconds=10),
                        "timeout": timedelta(seconds=120)})


def _get(location: str, store, key: str, attempts: int,
         first_wait_s: float) -> bytes | StorageError:
    """One object with one GET, retried with backoff; its StorageError when that fails."""
    import time

    import obstore
    from obstore.exceptions import NotFoundError

    wait = first_wait_s
    for attempt in range(1, attempts + 1):
        try:
            return bytes(obstore.get(store, key).bytes())
        except (NotFoundError, FileNotFoundError):
            return StorageError(f"{location}: no such file", not_found=True)
        except Exception as exc:  # obstore's errors, timeouts, connection failures
            if attempt == attempts:
                return StorageError(f"{location}: {_object_store_reason(exc)}")
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


def put(location: str, store, key: str, data: bytes) -> None:
    """Write one object with one PUT (pyarrow's stream costs a multipart upload: create, part,
    complete, after a HEAD of the bucket and a PUT of a folder marker). Raises StorageError."""
    import obstore

    try:
        obstore.put(store, key, data)
    except Exception as exc:  # obstore's errors, timeouts, connection failures
        raise StorageError(f"{location}: cannot write: {_object_store_reason(exc)}") from None


def _object_store_reason(exc: BaseException) -> str:
    """obstore's first line without the request's URL and timing (so that failures group),
    and the operating system's words for the cause, which only its debug dump holds."""
    text = str(exc)
    first = re.sub(r"Error performing \w+ \S+ in \S+ - ", "", first_line(exc))
    cause = re.findall(r'message: "([^"]+)"', text)
    return f"{first} ({cause[-1]})" if cause else first


@functools.cache
def _pool():
    """This process's reading threads, started once and kept (a Ray worker reads window after
    window; starting 32 threads a window would cost more than the reads)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(THREADS, thread_name_prefix="storage-read")
