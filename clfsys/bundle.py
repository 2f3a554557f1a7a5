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
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from clfsys.errors import BundleError

FORMAT = "clfsys-bundle"
FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"


def content_hash(model, class_names: list[str], input_shape, color_mode: str) -> str:
    """sha256 of the weights and the input/output description; the first 16 hex digits."""
    digest = hashlib.sha256()
    digest.update(json.dumps([list(class_names), list(input_shape), color_mode]).encode())
    for weight in model.get_weights():
        array = np.ascontiguousarray(weight)
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def save(
    out_dir: str | Path, model, *, class_names: list[str], color_mode: str, config: dict,
    metrics: dict, history: dict | None = None, extra: dict | None = None,
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
        "model_id": content_hash(model, class_names, input_shape, color_mode),
        "model_file_sha256": file_sha256,
        "class_names": list(class_names),
        "input_shape": input_shape,
        "color_mode": color_mode,
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
    metadata: dict[str, Any]

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
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{file}: cannot load the model (corrupt or unsafe): "
                              f"{first[:300]}") from None
        found = content_hash(model, self.class_names, self.input_shape, self.color_mode)
        if found != self.model_id:
            raise BundleError(f"{file}: weights do not match metadata model_id {self.model_id} "
                              f"(found {found}); the bundle is corrupt or was altered")
        return model


def load(path: str | Path) -> Bundle:
    """Read and check a bundle's metadata; fails with a `BundleError` naming the path."""
    root = Path(path)
    if not root.exists():
        raise BundleError(f"model bundle not found: {root}")
    if not root.is_dir():
        raise BundleError(f"{root} is not a model bundle (not a directory)")
    meta_file = root / METADATA_FILE
    if not meta_file.is_file():
        raise BundleError(f"{root} is not a clfsys model bundle (no {METADATA_FILE})")
    try:
        metadata = json.loads(meta_file.read_text())
    except (ValueError, OSError) as exc:
        raise BundleError(f"{meta_file}: unreadable metadata: {exc}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise BundleError(f"{root} is not a clfsys model bundle ({METADATA_FILE} has no "
                          f"format {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{root}: bundle format version {metadata.get('format_version')} is "
                          f"not supported (expected {FORMAT_VERSION})")
    for key in ("model_id", "class_names", "input_shape", "color_mode"):
        if key not in metadata:
            raise BundleError(f"{meta_file}: missing field {key!r}")
    if not (root / MODEL_FILE).is_file():
        raise BundleError(f"{root}: missing {MODEL_FILE}")
    return Bundle(root, metadata)
