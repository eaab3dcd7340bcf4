"""Reading input images (references, init images, masks) safely and the same way every time.

* PNG, JPEG and WebP only; anything else, a truncated file or a text file named .png is refused by name.
* A decompression-bomb guard: images above MAX_PIXELS (64 megapixels) are refused from their header, before
  any pixel is decoded.
* EXIF orientation is applied; every mode (RGBA, LA, L, P, CMYK, I;16, ...) becomes RGB, with a notice:
  transparent areas are composited over white, 16-bit images are scaled to 8 bits rather than clipped.
* Inputs smaller than MIN_SIDE on a side or more elongated than MAX_ASPECT are refused, as the FLUX.2
  reference code does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

MAX_PIXELS = 64_000_000
MIN_SIDE = 64
MAX_ASPECT = 8.0
FORMATS = {"PNG", "JPEG", "WEBP"}


@dataclass(frozen=True)
class ImageInfo:
    path: str
    width: int
    height: int
    sha256: str


def inspect(path: str | Path, what: str = "image", check_shape: bool = True) -> ImageInfo:
    """Check an input image from its header (cheap: no decoding) and hash its bytes. Masks skip the side and
    aspect checks (`check_shape=False`): they are resized to the image they belong to."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path} does not exist")
    data = p.read_bytes()
    try:
        with Image.open(p) as im:
            fmt, (w, h) = im.format, im.size
    except UnidentifiedImageError:
        raise UserError(f"{what} {path} is not an image fluxlab can read (PNG, JPEG or WebP)") from None
    except Image.DecompressionBombError:
        raise UserError(f"{what} {path} is too large: over the {MAX_PIXELS // 1_000_000} MP limit") from None
    except OSError as e:
        raise UserError(f"{what} {path} is unreadable ({e})") from None
    if fmt not in FORMATS:
        raise UserError(f"{what} {path} is {fmt}; use PNG, JPEG or WebP")
    if w * h > MAX_PIXELS:
        raise UserError(f"{what} {path} is {w}x{h} ({w * h / 1e6:.0f} MP), over the {MAX_PIXELS // 1_000_000} MP "
                        f"limit; downscale it first")
    if check_shape and min(w, h) < MIN_SIDE:
        raise UserError(f"{what} {path} is {w}x{h}; both sides must be at least {MIN_SIDE} px")
    if check_shape and max(w / h, h / w) > MAX_ASPECT:
        raise UserError(f"{what} {path} is {w}x{h}, an aspect ratio of {max(w / h, h / w):.1f}:1; "
                        f"the most is {MAX_ASPECT:g}:1")
    return ImageInfo(str(p), w, h, hashlib.sha256(data).hexdigest())


def load_rgb(path: str | Path, notify=None, what: str = "image", check_shape: bool = True):
    """Decode an input image as an RGB PIL image (EXIF-rotated), saying what was converted."""
    import numpy as np
    from PIL import Image, ImageOps

    inspect(path, what, check_shape)
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data past a valid header
        raise UserError(f"{what} {path} is corrupt ({e})") from None
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        im = im.convert("RGB")
    if notify is not None:
        notify(f"{what} {Path(path).name} is {mode}; converted to RGB"
               + (" (transparency composited over white)" if "A" in mode or mode == "P" else ""))
    return im


def load_mask(path: str | Path, size: tuple[int, int], notify=None):
    """A mask as a greyscale PIL image (white = repaint), resized to `size` with a notice when it differs."""
    from PIL import Image

    m = load_rgb(path, None, "mask", check_shape=False).convert("L")
    if m.size != size:
        if notify is not None:
            notify(f"mask {Path(path).name} is {m.width}x{m.height}; resized to the image's {size[0]}x{size[1]}")
        m = m.resize(size, Image.Resampling.NEAREST)
    return m
