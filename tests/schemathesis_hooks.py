"""Schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): the endpoint's binary bodies are
images, which a schema can only call "binary"; generate real PNG and JPEG files for them, of
random sizes, colours and modes, so positive examples are images and the server must accept them.
"""

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def images(draw) -> bytes:
    width = draw(st.integers(1, 64))
    height = draw(st.integers(1, 64))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA"]))
    seed = draw(st.integers(0, 2**32 - 1))
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    kind = draw(st.sampled_from(["PNG", "JPEG"]))
    buffer = io.BytesIO()
    (image.convert("RGB") if kind == "JPEG" and mode == "RGBA" else image).save(buffer, kind)
    return buffer.getvalue()


schemathesis.openapi.media_type("image/*", images(), aliases=["application/octet-stream"])
schemathesis.openapi.format("binary", images())
