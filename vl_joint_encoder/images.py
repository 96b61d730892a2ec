"""Robust image loading: every image becomes an RGB `PIL.Image`, or a clear error that names the file.

- Missing, unreadable, corrupt or truncated files raise `ImageLoadError` (a `ValueError`) with the file name; or, with
  `load_images(..., on_error="skip")`, they are skipped and reported.
- Grayscale (`L`, `1`), `RGBA`/`LA`/palette with transparency (composited on white, as browsers show them), `CMYK`,
  `YCbCr`/`LAB`/`HSV`, 16-bit and 32-bit integer (`I;16`, `I`) and float (`F`) images are converted to 8-bit RGB.
- The EXIF orientation tag is applied (phone photos), as `PIL.ImageOps.exif_transpose` does.
- Very large images: PIL refuses files above `2 * Image.MAX_IMAGE_PIXELS` (a decompression-bomb guard) with an
  obscure error. Here `max_pixels` is checked from the header first (clear error above it), files below it are
  decoded even past PIL's default guard, JPEGs are decoded at reduced size (`Image.draft`) and everything is
  downscaled to at most `max_side` pixels on its long side (CLIP resizes to 224-336 anyway).
  The limit (default 16384 x 16384 = 268,435,456 pixels) is raised for every command and every loader with the
  environment variable `VL_JOINT_ENCODER_MAX_IMAGE_PIXELS` (a number of pixels, or `none` to disable the check), and
  for `extract-features` also with `--max-pixels`.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.utils import logging


logger = logging.get_logger(__name__)

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray

# 16384 x 16384: far above any photo, far below what would exhaust memory (PIL's own default guard is ~89 MP).
DEFAULT_MAX_PIXELS = 16384 * 16384
DEFAULT_MAX_SIDE = 2048
MAX_PIXELS_ENV = "VL_JOINT_ENCODER_MAX_IMAGE_PIXELS"
FROM_ENVIRONMENT = "environment"  # load_image's default max_pixels: $VL_JOINT_ENCODER_MAX_IMAGE_PIXELS, else the default
_PIL_GUARD_LOCK = threading.Lock()


class ImageLoadError(ValueError):
    """An image could not be read or converted; `source` names the file (or the in-memory object)."""

    def __init__(self, source: Any, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot load image {_describe(source)}: {reason}")


@dataclass
class ImageFailure:
    """One image skipped by `load_images(..., on_error="skip")`."""

    index: int
    source: str
    reason: str


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (transparency composited on white, high bit depths rescaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        # palette images may carry transparency in info["transparency"]; go through RGBA to honour it
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float grayscale: rescale to 0..255 from the type's range (not the image's, so that a
        # dark 16-bit image stays dark)
        array = np.asarray(image).astype(np.float64)  # (H, W)
        if mode == "F":
            top = 1.0 if array.size and np.nanmax(array) <= 1.0 else 255.0
        elif mode.startswith("I;16") or (array.size and array.max() <= 65535):
            top = 65535.0
        else:
            top = float(2**32 - 1)
        array = np.nan_to_num(array, nan=0.0, posinf=top, neginf=0.0)
        gray = np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV: PIL's own conversions
    return image.convert("RGB")


def _from_array(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"an image array must be (H, W), (H, W, 3|4) or (3|4, H, W), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("the image array holds NaN or infinite values")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
            array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
        elif array.dtype == np.uint16:
            array = (array.astype(np.uint32) * 255 // 65535).astype(np.uint8)
        else:
            array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _downscale(image: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is not None and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def default_max_pixels() -> int | None:
    """The decompression-bomb limit: `$VL_JOINT_ENCODER_MAX_IMAGE_PIXELS` (pixels, or `none` for no limit) if set,
    else `DEFAULT_MAX_PIXELS`. A value that is neither is a ValueError naming the variable."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not value:
        return DEFAULT_MAX_PIXELS
    if value.lower() in ("none", "off", "unlimited"):
        return None
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(
            f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r}: give a positive number of pixels (e.g. 1000000000) or "
            f"'none' to disable the decompression-bomb check"
        )
    return int(value)


def load_image(
    source: ImageSource,
    max_pixels: int | None | str = FROM_ENVIRONMENT,
    max_side: int | None = DEFAULT_MAX_SIDE,
    exif_transpose: bool = True,
) -> Image.Image:
    """
    Open `source` (path, encoded bytes, PIL image or array) as an RGB image.

    Args:
        max_pixels: refuse (`ImageLoadError`) files with more pixels than this, read from the header before decoding.
            `None` disables the check; the default is `default_max_pixels()` (the environment variable
            `VL_JOINT_ENCODER_MAX_IMAGE_PIXELS`, else 268,435,456). Files under it are decoded even past PIL's
            default decompression-bomb guard.
        max_side: downscale (aspect kept) so that the long side is at most this many pixels; `None` keeps the size.
        exif_transpose: apply the EXIF orientation tag.

    Raises:
        ImageLoadError: missing file, not an image, truncated/corrupt data, too many pixels. The message names the file.
    """
    if max_pixels == FROM_ENVIRONMENT:
        max_pixels = default_max_pixels()
    if isinstance(source, Image.Image):
        image = source
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        return _downscale(to_rgb(image), max_side)
    if isinstance(source, np.ndarray):
        try:
            return _downscale(to_rgb(_from_array(source)), max_side)
        except ValueError as error:
            raise ImageLoadError(source, str(error)) from None
    if isinstance(source, (bytes, bytearray)):
        stream: Any = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ImageLoadError(source, "file not found (check the path and the image folder)")
        if os.path.isdir(path):
            raise ImageLoadError(source, "this is a directory, not an image file")
        stream = path
    else:
        raise ImageLoadError(
            source, f"unsupported type {type(source).__name__}: give a path, bytes, a PIL image or a numpy array"
        )
    try:
        with _PIL_GUARD_LOCK:
            previous_guard = Image.MAX_IMAGE_PIXELS
            # our own header check replaces PIL's guard (None disables it while this file is decoded)
            Image.MAX_IMAGE_PIXELS = None
            try:
                with Image.open(stream) as opened:
                    width, height = opened.size
                    if max_pixels is not None and width * height > max_pixels:
                        raise ImageLoadError(
                            source,
                            f"{width} x {height} = {width * height:,} pixels is above max_pixels={max_pixels:,} "
                            f"(a decompression-bomb guard); if you trust this file, raise the limit with "
                            f"{MAX_PIXELS_ENV}=N (N pixels, or 'none'; extract-features: --max-pixels N)",
                        )
                    if max_side is not None and opened.format == "JPEG":
                        opened.draft("RGB", (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale: fast, less memory
                    opened.load()
                    image = opened
                    if exif_transpose:
                        image = ImageOps.exif_transpose(image)
                    image = to_rgb(image)
                    if image is opened:
                        image = image.copy()  # detach from the file before it is closed
            finally:
                Image.MAX_IMAGE_PIXELS = previous_guard
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(source, "not a recognised image format (corrupt file or wrong extension)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(source, f"corrupt or truncated image data ({error})") from None
    return _downscale(image, max_side)


def load_images(
    sources: Iterable[ImageSource],
    on_error: str = "raise",
    **load_kwargs,
) -> tuple[list[Image.Image | None], list[ImageFailure]]:
    """
    Load several images. `on_error="raise"` raises on the first bad one; `"skip"` puts `None` in its place, logs a
    warning and returns the failures (index, source, reason) so that the caller can report them.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    images: list[Image.Image | None] = []
    failures: list[ImageFailure] = []
    for index, source in enumerate(sources):
        try:
            images.append(load_image(source, **load_kwargs))
        except ImageLoadError as error:
            if on_error == "raise":
                raise
            images.append(None)
            failures.append(ImageFailure(index, _describe(source).strip("'"), error.reason))
    if failures:
        logger.warning(
            "skipped %d unreadable image(s), first: %s (%s)", len(failures), failures[0].source, failures[0].reason
        )
    return images, failures


def list_image_files(folder: str | os.PathLike, extensions: Sequence[str] | None = None) -> list[str]:
    """Image files under `folder` (recursive), sorted; the default extensions are those PIL can open."""
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {os.fspath(folder)!r} does not exist or is not a directory")
    if extensions is None:
        extensions = [ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN]
    wanted = {ext.lower() if ext.startswith(".") else "." + ext.lower() for ext in extensions}
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.join(root, name) for name in names if os.path.splitext(name)[1].lower() in wanted]
    return sorted(files)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "FROM_ENVIRONMENT",
    "MAX_PIXELS_ENV",
    "ImageFailure",
    "ImageLoadError",
    "default_max_pixels",
    "list_image_files",
    "load_image",
    "load_images",
    "to_rgb",
]
