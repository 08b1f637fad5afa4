"""Turning whatever a user passes as an image into an RGB `PIL.Image`, with errors that name the image."""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
import urllib.request

import numpy as np
from PIL import Image, UnidentifiedImageError


def _decode(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{where}: the bytes could not be decoded as an image ({err}).") from None
    return image


_BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_\n\r")


def _from_base64(data: str, where: str) -> bytes:
    data = "".join(data.split())
    data += "=" * (-len(data) % 4)
    try:  # the standard alphabet, or the URL-safe one
        return base64.b64decode(data, altchars=b"-_" if ("-" in data or "_" in data) else None, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"{where}: the base64 image data could not be decoded ({err}).") from None


def _from_data_url(url: str, where: str) -> Image.Image:
    """``data:image/png;base64,...`` (what the openai client sends for a local image)."""
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64") or not header[len("data:"):].startswith("image/"):
        raise ValueError(f"{where}: malformed data URL {url[:40]!r}...; expected 'data:image/<format>;base64,<data>'.")
    return _decode(_from_base64(payload, f"{where} (data URL)"), f"{where} (data URL)")


def _open(source: str, where: str) -> Image.Image:
    """A path, a ``file://`` / ``http(s)://`` / ``data:`` URL, or raw base64 image data."""
    if source.startswith(("http://", "https://")):
        from transformers.image_utils import load_image

        return load_image(source)
    if source.startswith("data:"):
        return _from_data_url(source, where)
    if source.startswith("file://"):
        parsed = urllib.parse.urlparse(source)
        source = urllib.request.url2pathname(urllib.parse.unquote(parsed.path))
    if os.path.isfile(source):
        with open(source, "rb") as handle:
            return _decode(handle.read(), f"{where} ({source!r})")
    if len(source) >= 64 and set(source) <= _BASE64_CHARS:  # raw base64 (transformers' load_image takes it too)
        return _decode(_from_base64(source, where), f"{where} (base64 data)")
    shown = source if len(source) <= 80 else source[:77] + "..."
    raise ValueError(f"{where}: no image file at {shown!r} (expected a path, a file://, http(s):// or "
                     f"data:image/...;base64 URL, or base64 image data).")


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB copy of a PIL image: transparency is composited onto ``background`` (white), CMYK/palette/grayscale/16-bit
    images are converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # high bit depth: rescale to 8 bits before converting
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def load_rgb(image, where: str = "image"):
    """An RGB PIL image from a PIL image, a file path, a file:// / http(s):// / data: URL, base64 text, raw bytes or a
    2D/3D uint8 array; tensors pass through."""
    if isinstance(image, Image.Image):
        try:
            image.load()
        except OSError as err:
            raise ValueError(f"{where}: the image data is corrupt or truncated ({err}).") from None
        return to_rgb(image)
    if isinstance(image, (bytes, bytearray)):
        return to_rgb(_decode(bytes(image), where))
    if isinstance(image, str):
        return to_rgb(_open(image, where))
    if isinstance(image, dict) and ("bytes" in image or "path" in image):  # the `datasets` Image() storage format
        return load_rgb(image.get("bytes") or image.get("path"), where)
    if isinstance(image, np.ndarray) and image.ndim == 2:
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, np.ndarray) or hasattr(image, "shape"):  # numpy (H, W, C) or torch tensors
        return image
    raise TypeError(f"{where}: expected a PIL image, a path, a URL, bytes or an array, got {type(image).__name__}.")


def map_images(images):
    """`load_rgb` over one image, a flat list of images, or per-sample lists of images (structure kept)."""
    if isinstance(images, (list, tuple)):
        if any(isinstance(item, (list, tuple)) for item in images):
            return [[load_rgb(image, f"sample {i}, image {j}") for j, image in enumerate(sample)]
                    if isinstance(sample, (list, tuple)) else load_rgb(sample, f"sample {i}")
                    for i, sample in enumerate(images)]
        return [load_rgb(image, f"image {i}") for i, image in enumerate(images)]
    return load_rgb(images, "image")
