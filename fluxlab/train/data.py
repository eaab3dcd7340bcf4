"""Training images: folders with same-name captions, kohya-style repeats, zips opened safely, buckets.

* `40_maya_char/` repeats each of its images 40 times per epoch (seed 004's folder convention).
* `photo.png` + `photo.txt` (the dataset's caption_ext); a missing caption means the trigger word alone.
* `[trigger]` in a caption becomes the trigger word.
* With `caption_per_line` (kohya's multi-line captions), each non-empty line of a caption file is one caption of
  the image and every step that draws it picks one line at random: e.g. a full description and shorter ones, so
  that short prompts work too.
* Zips are extracted with every member checked: no absolute paths, no `..`, no links, and a cap on the total
  uncompressed size and on the compression ratio (zip bombs).
* Unreadable images are listed once, up front, and skipped.
* `control_path` (edit training, as ai-toolkit's): a folder holding, under the same file names, the reference
  image each training image was made from; the model learns to produce the image from its reference + caption.
* `mask_path` (as ai-toolkit's): a folder of grey-scale images under the same file names weighting the loss
  (white = full weight), to train on what matters in an image rather than on its background.
* Each resolution r puts every image in the bucket of about r x r pixels closest to its aspect ratio
  (sides multiples of 16), so several resolutions train the model at several sizes.
"""

from __future__ import annotations

import itertools
import math
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp"}
MAX_ZIP_BYTES = 4 * 2**30
MAX_ZIP_RATIO = 200
MAX_ZIP_MEMBERS = 20_000
REPEATS = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Item:
    path: Path
    captions: tuple[str, ...]  # one, or the alternatives of a caption_per_line file
    width: int  # bucket size the image is trained at
    height: int
    repeats: int
    control: Path | None = None  # the reference image (edit training)
    mask: Path | None = None  # the loss-weight image

    @property
    def caption(self) -> str:
        return self.captions[0]


def check_archive(archive: Path, zf) -> list:
    """Every member checked before anything is extracted: names that stay inside, no links, and the whole
    archive's size, member count and compression ratio within bounds (a zip bomb can hide in many small members
    as well as one large one)."""
    infos = zf.infolist()
    if len(infos) > MAX_ZIP_MEMBERS:
        raise UserError(f"{archive} has {len(infos)} members; at most {MAX_ZIP_MEMBERS} are accepted")
    total = packed = 0
    for info in infos:
        name = info.filename
        if name.startswith(("/", "\\")) or ".." in Path(name.replace("\\", "/")).parts or re.match(r"^[A-Za-z]:", name):
            raise UserError(f"{archive} has an unsafe member path {name!r} (absolute or with '..'); refusing it")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise UserError(f"{archive} has a symbolic link {name!r}; refusing it")
        if info.flag_bits & 0x1:
            raise UserError(f"{archive} member {name!r} is encrypted; give an unencrypted zip")
        total += info.file_size
        packed += info.compress_size
        if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO and info.file_size > 2**20:
            raise UserError(f"{archive} member {name!r} expands {info.file_size // info.compress_size}x: "
                            f"a zip bomb? refusing it")
    overlapping(archive, infos)
    if total > MAX_ZIP_BYTES:
        raise UserError(f"{archive} would expand to {total / 2**30:.1f} GB, over the "
                        f"{MAX_ZIP_BYTES // 2**30} GB limit")
    if total > 8 * 2**20 and total > MAX_ZIP_RATIO * max(packed, 1):
        raise UserError(f"{archive} would expand {total // max(packed, 1)}x ({total / 2**20:.0f} MB from "
                        f"{packed / 2**20:.1f} MB): a zip bomb? refusing it")
    return infos


def overlapping(archive: Path, infos: list) -> None:
    """Refuse members whose data overlap (the "better zip bomb": many directory entries pointing at one member, so
    a small file declares gigabytes and every size check above passes per member)."""
    spans = sorted((i.header_offset, i.header_offset + 30 + len(i.orig_filename.encode()) + i.compress_size,
                    i.filename) for i in infos)
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise UserError(f"{archive} members {name!r} and {other!r} share their data (overlapping entries: a zip "
                            f"bomb?); refusing it")


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a zip after checking every member; refuse traversal, links and bombs by name. Extraction goes to a
    temp folder renamed into place when whole, so a damaged archive (a bad CRC) leaves nothing behind."""
    import shutil
    import tempfile

    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{archive} is not a readable zip file ({e})") from None
    with zf:
        check_archive(archive, zf)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            zf.extractall(tmp)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{archive} is damaged ({e}); nothing was extracted") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if dest.is_dir():  # extracted before: replaced by this extraction, whole
            shutil.rmtree(dest)
        tmp.rename(dest)
    return dest


def bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (w, h) of about resolution^2 pixels, sides multiples of 16, closest to the image's aspect."""
    aspect = width / height
    w = resolution * math.sqrt(aspect)
    h = resolution / math.sqrt(aspect)
    return max(16, round(w / 16) * 16), max(16, round(h / 16) * 16)


def scan(folder: str | Path, caption_ext: str, trigger: str | None, resolutions: list[int], notify=print,
         workdir: Path | None = None, control: str | Path | None = None,
         mask: str | Path | None = None, per_line: bool = False) -> list[Item]:
    """The dataset's items: images with captions, repeats and buckets. A zip is extracted into workdir."""
    from ..spec.images import open_image

    root = Path(folder).expanduser()
    if not root.exists():
        raise UserError(f"dataset folder {folder} does not exist")
    if root.is_file():
        if root.suffix.lower() != ".zip":
            raise UserError(f"dataset {folder} is a file; give a folder of images or a .zip of them")
        root = safe_extract(root, Path(workdir or root.parent) / f"{root.stem}-extracted")
    repeats = 1
    m = REPEATS.match(root.name)
    if m:
        repeats = int(m.group(1))
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    for side in (control, mask):  # a control or mask folder kept inside the dataset holds no training images
        if side is not None:
            inner = Path(side).expanduser().resolve()
            files = [f for f in files if not f.resolve().is_relative_to(inner)]
    items, bad, uncaptioned = [], [], 0
    for f in files:
        try:
            im = open_image(f, "training image")  # the same header checks and pixel cap as every input
            w, h = im.size
            im.verify()
        except UserError as e:
            if "MP" in str(e) or "too large" in str(e):
                raise  # a decompression bomb in a dataset is refused, not skipped
            bad.append(f"{f.name} (unreadable)")
            continue
        except Exception as e:
            bad.append(f"{f.name} ({type(e).__name__})")
            continue
        cap_file = f.with_suffix("." + caption_ext.lstrip("."))
        if cap_file.is_file():
            caption = cap_file.read_text(encoding="utf-8", errors="replace").replace("\0", "").strip()
        else:
            caption = "[trigger]" if trigger else ""
            uncaptioned += 1
        if trigger:
            caption = caption.replace("[trigger]", trigger)
        lines = [x.strip() for x in caption.splitlines() if x.strip()] if per_line else []
        captions = tuple(lines) or (caption,)
        ref = _companion(f, root, control, "control") if control is not None else None
        weights = _companion(f, root, mask, "mask") if mask is not None else None
        for r in resolutions:
            bw, bh = bucket(w, h, r)
            items.append(Item(f, captions, bw, bh, repeats, ref, weights))
    if bad:
        notify(f"skipping {len(bad)} unreadable image(s) in {folder}: {', '.join(bad[:5])}"
               + (" ..." if len(bad) > 5 else ""))
    if uncaptioned:
        notify(f"{uncaptioned} image(s) in {folder} have no .{caption_ext.lstrip('.')} caption; "
               f"using {'the trigger word' if trigger else 'an empty caption'}")
    if not items:
        raise UserError(f"dataset {folder} has no readable images ({', '.join(sorted(IMAGE_EXTS))})")
    return items


def _companion(image: Path, root: Path, where: str | Path, kind: str) -> Path:
    """The control or mask image with the same relative name (any image extension) as `image`."""
    folder = Path(where).expanduser()
    if not folder.is_dir():
        raise UserError(f"{kind}_path {where} is not a folder")
    rel = image.relative_to(root).with_suffix("")
    for ext in sorted(IMAGE_EXTS):
        cand = folder / rel.with_suffix(ext)
        if cand.is_file():
            return cand
    raise UserError(f"no {kind} image for {image.name} in {where} (expected {rel}.png/.jpg/.webp there)")
