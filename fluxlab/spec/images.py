"""Reading input images (references, init images, masks, training images, PNGs to show) safely, and once.

* PNG, JPEG and WebP only; anything else, a truncated file or a text file named .png is refused by name.
* A decompression-bomb guard: images above MAX_PIXELS (64 megapixels) are refused from their header, before any
  pixel is decoded, wherever fluxlab opens an image.
* A file is read from disk once per request: `inspect` reads its bytes, hashes them and checks the header; the
  pixels are later decoded from those same bytes (`decode`), so the hash always describes the pixels used.
* EXIF orientation is applied; every mode (RGBA, LA, L, P, CMYK, I;16, ...) becomes RGB, with a notice:
  transparent areas are composited over white, 16-bit images are scaled to 8 bits rather than clipped. An
  animated image uses its first frame, and says so.
* Inputs smaller than MIN_SIDE on a side or more elongated than MAX_ASPECT are refused, as the FLUX.2 reference
  code does.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

MAX_PIXELS = 64_000_000
MIN_SIDE = 64
MAX_ASPECT = 8.0
FORMATS = {"PNG", "JPEG", "WEBP"}
MAX_FILE_BYTES = 256 * 2**20  # no legitimate input image is this large


@dataclass(frozen=True)
class ImageInfo:
    path: str
    width: int
    height: int
    sha256: str
    frames: int = 1
    data: bytes = field(default=b"", repr=False, compare=False)  # the file's bytes, read once


def read_input(path: Path) -> bytes:
    """The one place input image bytes are read from disk."""
    return Path(path).read_bytes()


@contextmanager
def guarded(what: str, path):
    """Open images with PIL's own bomb limit at ours and its warnings turned into our one-line errors."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", module="PIL")
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{what} {path} is too large: over the {MAX_PIXELS // 1_000_000} MP limit") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def open_image(path: str | Path, what: str = "image", data: bytes | None = None):
    """PIL image of a file (or its already-read bytes) after the header checks; the caller closes it."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if data is None:
        if p.is_dir():
            raise UserError(f"{what} {path} is a folder, not an image file")
        if not p.is_file():
            raise UserError(f"{what} {path} does not exist")
        if p.stat().st_size > MAX_FILE_BYTES:
            raise UserError(f"{what} {path} is {p.stat().st_size / 2**20:.0f} MB; the most is "
                            f"{MAX_FILE_BYTES // 2**20} MB")
        data = read_input(p)
    with guarded(what, path):
        try:
            im = Image.open(io.BytesIO(data))
            w, h = im.size
        except UnidentifiedImageError:
            raise UserError(f"{what} {path} is not an image fluxlab can read (PNG, JPEG or WebP)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"{what} {path} is unreadable ({e})") from None
    if im.format not in FORMATS:
        raise UserError(f"{what} {path} is {im.format}; use PNG, JPEG or WebP")
    if w * h > MAX_PIXELS:
        raise UserError(f"{what} {path} is {w}x{h} ({w * h / 1e6:.0f} MP), over the {MAX_PIXELS // 1_000_000} MP "
                        f"limit; downscale it first")
    return im


def inspect(path: str | Path, what: str = "image", check_shape: bool = True, decode: bool = True) -> ImageInfo:
    """Read an input image's bytes once, hash them and check its header. Masks skip the side and aspect checks
    (`check_shape=False`): they are resized to the image they belong to. With `decode` the pixels are decoded too
    (damage past the header is found now); without, only the file's structure is verified (PNG chunk checksums),
    which needs no memory for the pixels: a server checks uploads that way."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {path} is a folder, not an image file")
    if not p.is_file():
        raise UserError(f"{what} {path} does not exist")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserError(f"{what} {path} is {size / 2**20:.0f} MB; the most is {MAX_FILE_BYTES // 2**20} MB")
    data = read_input(p)
    im = open_image(p, what, data)
    w, h = im.size
    frames = getattr(im, "n_frames", 1)
    with guarded(what, path):
        try:  # damage past a valid header is found now, before any weights load, not halfway through a run
            im.load() if decode else im.verify()
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"{what} {path} is corrupt ({e})") from None
        finally:
            im.close()
    if check_shape and min(w, h) < MIN_SIDE:
        raise UserError(f"{what} {path} is {w}x{h}; both sides must be at least {MIN_SIDE} px")
    if check_shape and max(w / h, h / w) > MAX_ASPECT:
        raise UserError(f"{what} {path} is {w}x{h}, an aspect ratio of {max(w / h, h / w):.1f}:1; "
                        f"the most is {MAX_ASPECT:g}:1")
    return ImageInfo(str(p), w, h, hashlib.sha256(data).hexdigest(), frames, data)


def decode(info: ImageInfo, notify=None, what: str = "image"):
    """Decode an inspected image (from the bytes `inspect` read) as an RGB PIL image, EXIF-rotated, saying what
    was converted."""
    import numpy as np
    from PIL import Image, ImageOps

    data = info.data or read_input(Path(info.path))
    with guarded(what, info.path):
        try:
            im = Image.open(io.BytesIO(data))
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
        except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data past a valid header
            raise UserError(f"{what} {info.path} is corrupt ({e})") from None
    if info.frames > 1 and notify is not None:
        notify(f"{what} {Path(info.path).name} is animated ({info.frames} frames); using the first frame")
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
        notify(f"{what} {Path(info.path).name} is {mode}; converted to RGB"
               + (" (transparency composited over white)" if "A" in mode or mode == "P" else ""))
    return im


def load_rgb(path: str | Path, notify=None, what: str = "image", check_shape: bool = True):
    """inspect + decode: an input image file as RGB."""
    return decode(inspect(path, what, check_shape), notify, what)


def decode_mask(info: ImageInfo, size: tuple[int, int], notify=None):
    """A mask as a greyscale PIL image (white = repaint), resized to `size` with a notice when it differs."""
    from PIL import Image

    m = decode(info, None, "mask").convert("L")  # a mask's mode is converted anyway: no notice for that
    if info.frames > 1 and notify is not None:
        notify(f"mask {Path(info.path).name} is animated ({info.frames} frames); using the first frame")
    if m.size != size:
        if notify is not None:
            notify(f"mask {Path(info.path).name} is {m.width}x{m.height}; resized to the image's {size[0]}x{size[1]}")
        m = m.resize(size, Image.Resampling.NEAREST)
    return m


def load_mask(path: str | Path, size: tuple[int, int], notify=None):
    return decode_mask(inspect(path, "mask", check_shape=False), size, notify)
