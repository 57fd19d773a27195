"""Schemathesis hooks (loaded through schemathesis.toml): what valid `files` of each media type that POST
/v1/jobs documents are. A schema cannot say "these bytes are a PNG", so schemathesis would otherwise send
random bytes under an image media type and count the server's right answer (415) as a valid request
refused. Each strategy draws the whole `files` value, a list of one to three files: schemathesis uses a
media type's strategy as the value of the property it encodes, and sends a list as one part per file,
each with a filename (a single value would go as a bare form field)."""

import io
import tarfile

import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}


def images(fmt: str) -> st.SearchStrategy[bytes]:
    """One-colour images of 1 to 48 pixels a side, in `fmt` (PIL's name of the format)."""
    side = st.integers(1, 48)
    return st.builds(_image, st.tuples(side, side), st.tuples(*[st.integers(0, 255)] * 3), st.just(fmt))


def _image(size: tuple[int, int], colour: tuple[int, int, int], fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, fmt)
    return out.getvalue()


def shards() -> st.SearchStrategy[bytes]:
    """webdataset shards of one to three PNG images."""
    return st.lists(images("PNG"), min_size=1, max_size=3).map(_shard)


def _shard(pngs: list[bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for n, png in enumerate(pngs):
            member = tarfile.TarInfo(f"{n:04d}.png")
            member.size = len(png)
            tar.addfile(member, io.BytesIO(png))
    return out.getvalue()


def files(one: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[bytes]]:
    return st.lists(one, min_size=1, max_size=3)


for media_type, fmt in FORMATS.items():
    schemathesis.openapi.media_type(media_type, files(images(fmt)))
schemathesis.openapi.media_type("application/x-tar", files(shards()))
