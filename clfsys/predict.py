"""Predictor: loads a bundle once and maps batches of raw uint8 images to labels. No Ray.

The same object runs in unit tests, inside Ray Data's `map_batches` and in the Serve replica.
The model is called through one tf.function with a fixed signature ([None, H, W, C] uint8), so
batches of any size never retrace.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from clfsys import images
from clfsys.bundle import Bundle
from clfsys.bundle import load as load_bundle


def configure_gpu_memory_growth() -> None:
    """Let several processes share a GPU: TF must not grab all its memory up front."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process
            pass


def forward_function(model, input_shape: tuple[int, ...]):
    """The model as one tf.function of (N, *input_shape) uint8 batches: the call every consumer
    of a bundle makes (labelling, serving, and the cost a search measures)."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *input_shape], tf.uint8)
    return tf.function(lambda x: model(x, training=False), input_signature=[spec],
                       reduce_retracing=True)


def serving_cost(model, input_shape: tuple[int, ...], *, seconds: float = 0.25) -> dict:
    """What `model` costs to serve, measured here on this process's device through the same
    compiled call as the Predictor: median milliseconds per image at batch 1 and at batch 32
    (over at least 5 calls and about `seconds` each, after a warm-up) and its parameter count."""
    forward = forward_function(model, input_shape)
    cost: dict[str, float] = {}
    for size in (1, 32):
        batch = np.zeros((size, *input_shape), dtype=np.uint8)
        np.asarray(forward(batch))  # trace and warm up
        times: list[float] = []
        until = time.perf_counter() + seconds
        while len(times) < 5 or (time.perf_counter() < until and len(times) < 1000):
            start = time.perf_counter()
            np.asarray(forward(batch))
            times.append(time.perf_counter() - start)
        cost[f"ms_per_image_b{size}"] = round(1000 * float(np.median(times)) / size, 4)
    cost["params"] = int(model.count_params())
    return cost


class Predictor:
    """Label batches of images with the model in a bundle."""

    def __init__(self, bundle: str | Path | Bundle, top_k: int = 3, batch_size: int = 256):
        configure_gpu_memory_growth()
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.model = self.bundle.load_model()
        self.class_names = self.bundle.class_names
        self.top_k = max(1, min(top_k, len(self.class_names)))
        self.batch_size = batch_size
        self._forward = forward_function(self.model, self.bundle.input_shape)

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    def warm_up(self) -> None:
        """Trace the model's call now: the first call of the tf.function pays its tracing."""
        self.probabilities(np.zeros((1, *self.bundle.input_shape), dtype=np.uint8))

    def decode(self, data: bytes) -> np.ndarray:
        """Image bytes -> this model's input array (raises images.ImageError)."""
        return images.decode(data, self.bundle.image_size, self.bundle.color_mode,
                             resize=self.bundle.resize)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, classes) probabilities."""
        batch = np.asarray(batch)
        expected = self.bundle.input_shape
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, expected))}), "
                             f"got {batch.shape}")
        if batch.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels, got {batch.dtype}")
        if len(batch) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        out = [np.asarray(self._forward(batch[i:i + self.batch_size]))
               for i in range(0, len(batch), self.batch_size)]
        return np.concatenate(out)

    def predict(self, batch: np.ndarray) -> dict[str, Any]:
        """Labels for a batch: label_index, label, confidence, top_k_index, top_k_score and
        the class probabilities."""
        probs = self.probabilities(batch)
        order = np.argsort(-probs, axis=1, kind="stable")[:, : self.top_k]
        scores = np.take_along_axis(probs, order, axis=1)
        index = order[:, 0] if len(order) else np.zeros(0, dtype=np.int64)
        return {
            "label_index": index.astype(np.int64),
            "label": np.asarray([self.class_names[i] for i in index], dtype=object),
            "confidence": scores[:, 0].astype(np.float64) if len(scores) else np.zeros(0),
            "top_k_index": order.astype(np.int64),
            "top_k_score": scores.astype(np.float64),
            "probabilities": probs,
        }

    def rows(self, batch: np.ndarray) -> list[dict[str, Any]]:
        """One prediction record per image, the shape that labelling writes and the endpoint
        returns: label, label_index, confidence, top_k [{label, score}] and probabilities."""
        result = self.predict(batch)
        return [{"label": str(result["label"][i]),
                 "label_index": int(result["label_index"][i]),
                 "confidence": float(result["confidence"][i]),
                 "top_k": [{"label": self.class_names[int(k)], "score": float(score)}
                           for k, score in zip(result["top_k_index"][i],
                                               result["top_k_score"][i], strict=True)],
                 "probabilities": result["probabilities"][i].tolist()}
                for i in range(len(result["label_index"]))]
