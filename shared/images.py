"""Image inputs: files, directories and webdataset .tar shards -> `ImageItem`s, and safe decoding.

A webdataset shard groups members by key (the member path up to the first dot of its file name):
key.jpg / key.png / key.webp is the image; key.json and key.txt, when present, travel along as
`meta`. Decoding checks the content (not the file name), refuses decompression bombs and reads the
whole image, so a truncated file fails here with a message instead of later in a batch.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}
DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An input that is not a usable image; the message names the reason."""


@dataclass
class ImageItem:
    id: str
    source: str
    data: bytes
    meta: dict | None = None
    error: str | None = None  # set when the input could not even be read
    size: tuple[int, int] | None = None  # (width, height), set once the image is decoded (load_pixels)


def sniff(data: bytes) -> str | None:
    """What the bytes are, by magic number: jpeg | png | webp | tar, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if len(data) > 262 and data[257:262] == b"ustar":
        return "tar"
    return None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB image, or ImageError saying why not."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    kind = sniff(data)
    if kind not in ("jpeg", "png", "webp"):
        raise ImageError("not a JPEG, PNG or WebP image (content check)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise ImageError(f"image too large: {img.width}x{img.height} pixels (limit {max_pixels})")
            img.load()  # decode everything now: truncated data fails here
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"image too large: {e}") from e
    except Exception as e:
        raise ImageError(f"corrupt {kind} image: {e}") from e
    return img.convert("RGB")


def _shard_items(path: Path) -> Iterator[ImageItem]:
    """Items of one webdataset .tar shard, in the order their images appear; an unreadable
    shard becomes one item carrying the error."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                if "." not in base:
                    continue
                key, ext = base.split(".", 1)
                key = f"{folder}/{key}" if folder else key
                groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        yield ImageItem(id=path.stem, source=str(path), data=b"", error=f"unreadable tar shard: {e}")
        return
    for key, parts in groups.items():
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
        if image_ext is None:
            continue
        meta: dict = {}
        if "json" in parts:
            try:
                meta["json"] = json.loads(parts["json"])
            except ValueError:
                meta["json_error"] = "key.json is not valid JSON"
        if "txt" in parts:
            meta["txt"] = parts["txt"].decode("utf-8", errors="replace")
        yield ImageItem(id=key, source=f"{path}:{key}.{image_ext}", data=parts[image_ext], meta=meta or None)


def _file_item(path: Path, item_id: str) -> ImageItem:
    try:
        return ImageItem(id=item_id, source=str(path), data=path.read_bytes())
    except OSError as e:
        return ImageItem(id=item_id, source=str(path), data=b"", error=f"cannot read file: {e}")


def check_inputs(paths: Iterable[str | Path]) -> None:
    """Fail before any work (model loading included) on a path that does not exist or a directory
    that holds no image and no .tar shard; FileNotFoundError names it."""
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if path.is_dir() and not any(f.suffix.lower() in IMAGE_EXTS | {".tar"} for f in path.rglob("*") if f.is_file()):
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) or .tar shards in {path}")


def iter_items(paths: Iterable[str | Path]) -> Iterator[ImageItem]:
    """Expand image files, directories (recursively, sorted) and .tar shards into items.
    Ids are unique within the run: a repeated id gets a -2, -3, ... suffix."""
    seen: dict[str, int] = {}

    def unique(item: ImageItem) -> ImageItem:
        n = seen.get(item.id, 0) + 1
        seen[item.id] = n
        if n > 1:
            item.id = f"{item.id}-{n}"
        return item

    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if path.is_dir():
            skipped = []
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                if f.suffix.lower() in IMAGE_EXTS:
                    yield unique(_file_item(f, str(f.relative_to(path).with_suffix(""))))
                elif f.suffix.lower() == ".tar":
                    yield from (unique(i) for i in _shard_items(f))
                else:
                    skipped.append(str(f.relative_to(path)))
            if skipped:
                shown = ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else "")
                log.warning(f"skipped {len(skipped)} file(s) in {path} that are not {'/'.join(sorted(IMAGE_EXTS))}"
                            f" images or .tar shards: {shown}", extra={"skipped": len(skipped)})
        elif path.suffix.lower() == ".tar":
            yield from (unique(i) for i in _shard_items(path))
        else:
            yield unique(_file_item(path, path.stem))
