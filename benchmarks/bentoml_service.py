"""The peer of `clfsys serve` in benchmarks/serve.py: the same model.keras behind BentoML, as
BentoML's docs would have a user write it: one service, the image uploaded as the multipart
field `images` (BentoML reads PIL images from files; a raw image body is refused as JSON when
the input is a batch), adaptive batching on the model call (`batchable=True`) with clfsys's
batch size.

It runs in its own environment (runs/bench/bentoml-env, from locks/bentoml.txt), without
clfsys: `bentoml serve bentoml_service:Classifier` in benchmarks/, with the bundle's folder in
CLFSYS_BENCH_BUNDLE and the largest batch in CLFSYS_BENCH_MAX_BATCH.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import bentoml
import numpy as np
from PIL.Image import Image

BUNDLE = Path(os.environ.get("CLFSYS_BENCH_BUNDLE", "."))
MAX_BATCH = int(os.environ.get("CLFSYS_BENCH_MAX_BATCH", "32"))


@bentoml.service(traffic={"concurrency": 256})
class Classifier:
    def __init__(self) -> None:
        import keras

        metadata = json.loads((BUNDLE / "metadata.json").read_text())
        self.height, self.width, channels = metadata["input_shape"]
        self.mode = "L" if channels == 1 else "RGB"
        self.classes = metadata["class_names"]
        self.model_id = metadata["model_id"]
        self.model = keras.saving.load_model(BUNDLE / "model.keras", compile=False)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH)
    def predict(self, images: list[Image]) -> list[dict]:
        pixels = np.stack([np.asarray(image.convert(self.mode).resize(
            (self.width, self.height))) for image in images])
        probabilities = np.asarray(self.model(
            pixels.reshape(len(images), self.height, self.width, -1), training=False))
        return [{"label": self.classes[int(p.argmax())], "label_index": int(p.argmax()),
                 "confidence": float(p.max()), "model_id": self.model_id}
                for p in probabilities]
