import io

import numpy as np
import pytest
from PIL import Image

from clfsys import images
from clfsys.images import ImageError, decode


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"])
@pytest.mark.parametrize("mode, channels", [("rgb", 3), ("grayscale", 1)])
def test_formats_decode_to_model_shape(rgb, fmt, mode, channels):
    out = decode(encode(rgb, fmt), (28, 24), mode)
    assert out.shape == (28, 24, channels) and out.dtype == np.uint8


def test_png_pixels_are_exact_when_no_resize_is_needed(rgb):
    assert np.array_equal(decode(encode(rgb, "PNG"), (30, 40), "rgb"), np.asarray(rgb))


def test_grayscale_to_rgb_repeats_the_channel():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    out = decode(encode(gray, "PNG"), (8, 8), "rgb")
    assert np.array_equal(out[..., 0], out[..., 2]) and np.array_equal(out[..., 0], gray)


def test_cmyk_jpeg(rgb):
    out = decode(encode(rgb.convert("CMYK"), "JPEG"), (30, 40), "rgb")
    assert np.abs(out.astype(int) - np.asarray(rgb, dtype=int)).mean() < 30


def test_16bit_is_scaled_not_clipped():
    values = np.full((4, 4), 65535 // 2, dtype=np.uint16)
    out = decode(encode(Image.fromarray(values), "PNG"), (4, 4), "grayscale")
    assert 120 <= int(out.mean()) <= 135


def test_transparency_is_composited_on_black():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    out = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"), (4, 4), "grayscale")
    assert out[:2].min() == 200 and out[2:].max() == 0


def test_palette_with_transparency(rgb):
    out = decode(encode(rgb.convert("P"), "PNG", transparency=0), (30, 40), "rgb")
    assert out.shape == (30, 40, 3)


def test_animation_takes_the_first_frame():
    frames = [Image.new("L", (6, 6), v) for v in (10, 240)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    out = decode(buffer.getvalue(), (6, 6), "grayscale")
    assert abs(int(out.mean()) - 10) <= 2


def test_exif_orientation_is_honoured():
    image = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (20, 1)))  # wide ramp
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90: displayed tall
    data = encode(image, "JPEG", exif=exif)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    from PIL import ImageOps

    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert expected.shape == (40, 20)
    out = decode(data, (40, 20), "grayscale")
    assert np.abs(out[..., 0].astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("mode", ["rgb", "grayscale"])
def test_large_jpeg_decoded_at_reduced_scale_matches_full_decode(mode):
    # A smooth 800x600 "photo", stored rotated with EXIF orientation 6 (displayed 600x800):
    # the reduced-scale JPEG decode must keep the orientation and stay close to a full decode.
    y, x = np.mgrid[0:600, 0:800]
    pixels = np.stack([x * 255 // 800, y * 255 // 600, (x + y) * 255 // 1400], -1)
    image = Image.fromarray(pixels.astype(np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", quality=95, exif=exif)
    from PIL import ImageOps

    full = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    full = full.convert("L" if mode == "grayscale" else "RGB").resize((48, 64), Image.BILINEAR)
    expected = np.asarray(full, dtype=int).reshape(64, 48, -1)
    out = decode(data, (64, 48), mode)
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).mean() < 3


@pytest.mark.parametrize("payload, kind", [
    (b"", images.EMPTY),
    (b"this is plain text, not pixels" * 4, images.NOT_AN_IMAGE),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, images.NOT_AN_IMAGE),
])
def test_error_kinds(payload, kind):
    with pytest.raises(ImageError) as err:
        decode(payload, (8, 8), "rgb")
    assert err.value.kind == kind


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(rgb, fmt):
    data = encode(rgb, fmt)
    with pytest.raises(ImageError) as err:
        decode(data[: len(data) // 3], (8, 8), "rgb")
    assert err.value.kind == images.TRUNCATED


def test_too_many_pixels_is_refused_before_decoding():
    data = encode(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(ImageError) as err:
        decode(data, (8, 8), "rgb", max_pixels=5_000_000)
    assert err.value.kind == images.TOO_MANY_PIXELS
    assert decode(data, (8, 8), "rgb", max_pixels=6_000_000).shape == (8, 8, 3)


def test_extensions_are_case_insensitive():
    assert images.is_image_path("a/B.JPeG") and images.is_image_path("x.webp")
    assert not images.is_image_path("notes.txt") and not images.is_image_path("png")


def bands(width: int = 60, height: int = 20) -> bytes:
    """Three vertical bands, red | green | blue, on a wide image."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    pixels[:, :third, 0] = pixels[:, third:2 * third, 1] = pixels[:, 2 * third:, 2] = 255
    return encode(Image.fromarray(pixels), "PNG")


def test_resize_modes_stretch_pad_and_crop():
    data = bands()
    stretched = decode(data, (16, 16), "rgb")
    assert stretched.shape == (16, 16, 3)
    assert stretched[8, 1].argmax() == 0 and stretched[8, 8].argmax() == 1
    assert stretched[8, 14].argmax() == 2 and stretched[0].max() == 255  # no border

    padded = decode(data, (16, 16), "rgb", resize="pad")
    assert padded.shape == (16, 16, 3)
    content = np.flatnonzero(padded.max(axis=(1, 2)) > 0)  # rows that are not black border
    assert len(content) in (5, 6) and content[0] >= 5 and content[-1] <= 10  # 16 * 20 / 60
    assert padded[:5].max() == 0 and padded[11:].max() == 0
    row = padded[content[len(content) // 2]]
    assert [row[1].argmax(), row[8].argmax(), row[14].argmax()] == [0, 1, 2]

    cropped = decode(data, (16, 16), "rgb", resize="crop")
    assert cropped.shape == (16, 16, 3)
    # The centre 20x20 of the 60x20 image is the green band, top to bottom.
    assert (cropped[..., 1] > 200).all() and cropped[..., [0, 2]].max() < 60

    tall = decode(encode(Image.new("L", (10, 40), 255), "PNG"), (8, 8), "grayscale",
                  resize="pad")
    assert tall.shape == (8, 8, 1) and tall[:, 0].max() == 0 and tall[:, -1].max() == 0
    assert tall[:, 4].min() == 255
    with pytest.raises(ValueError, match="resize must be one of"):
        decode(data, (16, 16), "rgb", resize="squash")
