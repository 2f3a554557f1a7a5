"""The self-describing model bundle: the hand-off from search to labelling to serving.

A bundle is a directory::

    model.keras       the Keras model (uint8 pixels in, class probabilities out)
    metadata.json     class names, input shape, colour mode, config, metrics, versions, model_id
    history.json      per-epoch training history
    plots/            learning curves, confusion matrix, sample predictions (PNG)
    saved_model/      a TensorFlow SavedModel export (`tf.saved_model.load(...).serve(x)`)

`model_id` is a content hash of the weights and the class/input description, checked on load;
`model_file_sha256` lets a process without TensorFlow check model.keras (`Bundle.check_file`).
Loading uses Keras safe mode: no code from a bundle is executed.

A bundle may live at a local path or a URI (see `storage`). One at a URI is fetched (metadata and
model.keras only) into a local cache keyed by its file hash. `Portable` carries a bundle to Ray
actors and Serve replicas on any node: the URI itself, or the files' bytes for a bundle that only
the driver's machine can see; either way the receiver checks `model_id`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from clfsys import storage
from clfsys.config import RESIZE_MODES
from clfsys.errors import BundleError, first_line

FORMAT = "clfsys-bundle"
FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"


def content_hash(model, class_names: list[str], input_shape, color_mode: str,
                 resize: str = "stretch") -> str:
    """sha256 of the weights and the input/output description; the first 16 hex digits.
    (`resize` counts only when not the default, so bundles from before it keep their id.)"""
    digest = hashlib.sha256()
    described = [list(class_names), list(input_shape), color_mode]
    digest.update(json.dumps(described + ([resize] if resize != "stretch" else [])).encode())
    for weight in model.get_weights():
        array = np.ascontiguousarray(weight)
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def save(
    out_dir: str | Path, model, *, class_names: list[str], color_mode: str, config: dict,
    metrics: dict, history: dict | None = None, extra: dict | None = None,
    resize: str = "stretch",
) -> dict[str, Any]:
    """Write `model` and its description to `out_dir`; returns the metadata written."""
    import keras
    import tensorflow as tf

    from clfsys import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    input_shape = [int(d) for d in model.input_shape[1:]]
    model.save(out / MODEL_FILE)
    file_sha256 = _file_sha256(out / MODEL_FILE)
    model.export(str(out / "saved_model"), format="tf_saved_model", verbose=False)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": content_hash(model, class_names, input_shape, color_mode, resize),
        "model_file_sha256": file_sha256,
        "class_names": list(class_names),
        "input_shape": input_shape,
        "color_mode": color_mode,
        "resize": resize,
        "input_dtype": "uint8",
        "config": config,
        "metrics": metrics,
        "versions": {"clfsys": __version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__, "python": platform.python_version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    if history is not None:
        (out / "history.json").write_text(json.dumps(history, indent=1))
    return metadata


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Bundle:
    """A bundle's description; `load_model()` reads the Keras model (safe mode)."""

    path: Path
    """Local directory holding the files (a cache copy for a bundle at a URI)."""
    metadata: dict[str, Any]
    location: str = ""
    """Where the user said the bundle is: a local path or a URI."""

    @property
    def model_id(self) -> str:
        return self.metadata["model_id"]

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.metadata["input_shape"])  # type: ignore[return-value]

    @property
    def color_mode(self) -> str:
        return self.metadata["color_mode"]

    @property
    def resize(self) -> str:
        """How images reach the input size (config.RESIZE_MODES); bundles from before the
        choice stretched."""
        return self.metadata.get("resize", "stretch")

    @property
    def image_size(self) -> tuple[int, int]:
        return self.input_shape[0], self.input_shape[1]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.metadata.get("metrics", {})

    def check_file(self) -> None:
        """Cheap integrity check without TensorFlow: model.keras has the bytes it was saved
        with (bundles from before this check have no file hash and pass)."""
        expected = self.metadata.get("model_file_sha256")
        if expected and _file_sha256(self.path / MODEL_FILE) != expected:
            raise BundleError(f"{self.path / MODEL_FILE}: file does not match metadata "
                              "model_file_sha256; the bundle is corrupt or was altered")

    def load_model(self):
        """The Keras model, loaded in safe mode and checked against `model_id`."""
        import keras

        file = self.path / MODEL_FILE
        try:
            model = keras.saving.load_model(file, compile=False, safe_mode=True)
        except Exception as exc:
            raise BundleError(f"{file}: cannot load the model (corrupt or unsafe): "
                              f"{first_line(exc)}") from None
        found = content_hash(model, self.class_names, self.input_shape, self.color_mode,
                             self.resize)
        if found != self.model_id:
            raise BundleError(f"{file}: weights do not match metadata model_id {self.model_id} "
                              f"(found {found}); the bundle is corrupt or was altered")
        return model


def load(location: str | Path) -> Bundle:
    """Read and check a bundle's metadata; fails with a `BundleError` naming the location.

    A bundle at a URI is fetched into a local cache first (metadata.json and model.keras).
    """
    where = storage.normalize(location)
    if storage.is_uri(where):
        return _load_remote(where)
    root = Path(where)
    if not root.exists():
        raise BundleError(f"model bundle not found: {location}")
    if not root.is_dir():
        raise BundleError(f"{location} is not a model bundle (not a directory)")
    meta_file = root / METADATA_FILE
    if not meta_file.is_file():
        raise BundleError(f"{location} is not a clfsys model bundle (no {METADATA_FILE})")
    try:
        text = meta_file.read_text()
    except OSError as exc:
        raise BundleError(f"{meta_file}: unreadable metadata: {exc}") from None
    metadata = _check_metadata(text, str(location))
    if not (root / MODEL_FILE).is_file():
        raise BundleError(f"{location}: missing {MODEL_FILE}")
    return Bundle(root, metadata, location=str(location))


def _check_metadata(text: str, location: str) -> dict[str, Any]:
    meta_file = f"{location.rstrip('/')}/{METADATA_FILE}"
    try:
        metadata = json.loads(text)
    except ValueError as exc:
        raise BundleError(f"{meta_file}: unreadable metadata: {exc}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise BundleError(f"{location} is not a clfsys model bundle ({METADATA_FILE} has no "
                          f"format {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{location}: bundle format version "
                          f"{metadata.get('format_version')} is not supported (expected "
                          f"{FORMAT_VERSION})")
    for key in ("model_id", "class_names", "input_shape", "color_mode"):
        if key not in metadata:
            raise BundleError(f"{meta_file}: missing field {key!r}")
    if metadata.get("resize", "stretch") not in RESIZE_MODES:
        raise BundleError(f"{meta_file}: field 'resize' must be one of {list(RESIZE_MODES)}, "
                          f"got {metadata['resize']!r}")
    return metadata


def cache_root() -> Path:
    return storage.cache_dir("bundles")


def _load_remote(uri: str) -> Bundle:
    try:
        text = storage.read_text(storage.join(uri, METADATA_FILE))
    except storage.StorageError as exc:
        if exc.not_found:
            raise BundleError(f"{uri} is not a clfsys model bundle (no {METADATA_FILE})") \
                from None
        raise BundleError(f"cannot read model bundle {uri}: {exc}") from None
    metadata = _check_metadata(text, uri)

    def fetch() -> dict[str, bytes]:
        try:
            return {METADATA_FILE: text.encode(),
                    MODEL_FILE: storage.read_bytes(storage.join(uri, MODEL_FILE))}
        except storage.StorageError as exc:
            raise BundleError(f"{uri}: cannot read {MODEL_FILE}: {exc}") from None

    return _cached(metadata, fetch, uri)


def _cached(metadata: dict[str, Any], fetch, location: str) -> Bundle:
    """The bundle from the local cache, fetched (by `fetch() -> files`) when not there yet."""
    key = metadata.get("model_file_sha256") or hashlib.sha256(location.encode()).hexdigest()
    local = cache_root() / f"{metadata['model_id']}-{key[:16]}"
    found = Bundle(local, metadata, location=location)
    if (local / MODEL_FILE).is_file() and (local / METADATA_FILE).is_file():
        try:
            found.check_file()
            return found
        except BundleError:
            pass  # a stale or partial copy: fetch again
    _materialize(local, fetch())
    found.check_file()
    return found


def _materialize(folder: Path, files: dict[str, bytes]) -> None:
    """Write the files into `folder` atomically (a sibling temp dir renamed into place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder.parent))
    for name, data in files.items():
        (staging / name).write_bytes(data)
    try:
        os.rename(staging, folder)
    except OSError:  # another process got there first, or a stale copy is in the way
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(staging, folder)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class Portable:
    """A bundle on its way to another process, maybe on another node (picklable)."""

    model_id: str
    uri: str | None = None
    """Read from this URI wherever it is opened..."""
    files: dict[str, bytes] = field(default_factory=dict, repr=False)
    """...or these files, shipped by the driver (a bundle only its machine can see)."""

    def open(self) -> Bundle:
        """The bundle, as a local directory on this node, checked against `model_id`."""
        if self.uri:
            found = load(self.uri)
        else:
            metadata = _check_metadata(self.files[METADATA_FILE].decode(), "shipped bundle")
            found = _cached(metadata, lambda: self.files, "shipped bundle")
        if found.model_id != self.model_id:
            raise BundleError(f"{self.uri or 'the shipped bundle'} has model_id "
                              f"{found.model_id}, expected {self.model_id}; it changed "
                              "since the job started")
        return found


def portable(found: Bundle) -> Portable:
    """The bundle for other nodes: its URI, or its files when it is local to this machine."""
    if storage.is_uri(found.location):
        return Portable(found.model_id, uri=found.location)
    return Portable(found.model_id, files={
        name: (found.path / name).read_bytes() for name in (METADATA_FILE, MODEL_FILE)})
