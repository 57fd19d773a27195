"""A POST /v1/jobs request -> the job's input files, every limit checked at the edge with a 4xx reason.

Uploads (multipart `files`): the body size (Content-Length, before anything is read) and file count;
each file must be a JPEG, PNG or WebP image or a .tar shard by its content, whatever its name says,
and not empty. Shards named by path (JSON `shards`) must resolve (symlinks and `..` followed) inside a
configured data root; http(s) URLs are fetched only when enabled. Pixel limits, truncated and corrupt
images are checked when the images are read (services.gateway.submit)."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import httpx
from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from latent_verbalizer.services.gateway.schemas import FieldError
from latent_verbalizer.shared.images import sniff
from latent_verbalizer.shared.jobs import JobOptions
from latent_verbalizer.shared.settings import Settings

SUFFIX = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "tar": ".tar"}
OPTIONS_FIELD_BYTES = 64 * 1024
JSON_BODY_BYTES = 1024 * 1024
DOWNLOAD_TIMEOUT_S = 30.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
M = TypeVar("M", bound=BaseModel)


@dataclass
class JobInput:
    path: Path  # the file the gateway reads: a saved upload or a shard on the server
    name: str  # how results name it: the upload's file name, or the shard as the client wrote it
    kind: str  # jpeg | png | webp | tar


def check_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise HTTPException(411, "send a Content-Length header (streamed uploads are not accepted)")
    if int(length) > limit:
        raise HTTPException(413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes")


def invalid(e: ValidationError, what: str = "options") -> FieldError:
    """A 422 naming the first problem pydantic found, e.g. "bad options at decode.seq_len: ..."."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return FieldError(422, f"bad {what}{' at ' + where if where else ''}: {first['msg']}",
                      f"{what}.{where}" if where else what)


async def read_uploads(request: Request, settings: Settings, dest: Path) -> tuple[list[JobInput], JobOptions]:
    """Save the multipart `files` under dest (one folder each, so equal names never collide) and parse
    the optional `options` JSON field."""
    check_length(request, settings.max_upload_bytes)
    try:
        form = await request.form(max_files=settings.max_files, max_fields=16, max_part_size=OPTIONS_FIELD_BYTES)
    except StarletteHTTPException as e:  # Starlette answers 400 to a form over its limits
        if "Too many files" in str(e.detail):
            raise HTTPException(413, f"too many files: at most {settings.max_files} per job") from e
        raise
    options = await _parse_options(form.get("options"))
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not files:
        raise FieldError(422, "no files: send one or more images or .tar shards as multipart field `files`", "files")
    inputs = []
    for n, upload in enumerate(files):
        name = Path((upload.filename or "").replace("\\", "/")).name or f"file-{n}"
        head = await upload.read(512)  # enough for every magic number, a tar's included
        if not head:
            raise FieldError(422, f"{name}: empty file (0 bytes)", "files")
        kind = sniff(head)
        if kind is None:
            raise FieldError(415, f"{name}: not a JPEG, PNG or WebP image, nor a .tar shard (content check)", "files")
        path = dest / str(n) / f"{_safe_stem(name)}{SUFFIX[kind]}"
        path.parent.mkdir(parents=True)
        await upload.seek(0)
        await run_in_threadpool(_save, upload.file, path)
        inputs.append(JobInput(path, name, kind))
    return inputs, options


def _save(source: BinaryIO, path: Path) -> None:
    with path.open("wb") as out:
        shutil.copyfileobj(source, out)


async def _parse_options(field: str | UploadFile | None) -> JobOptions:
    """The `options` part, JSON text: a plain field (curl -F options=...), or a part with a file name, as a
    browser sends a JSON Blob (/docs does)."""
    if field is None:
        return JobOptions()
    text = field
    if isinstance(field, UploadFile):
        text = await field.read(OPTIONS_FIELD_BYTES + 1)
        if len(text) > OPTIONS_FIELD_BYTES:
            raise FieldError(413, f"options over {OPTIONS_FIELD_BYTES} bytes", "options")
    return parse_json(JobOptions, text, "options")


def parse_json(model: type[M], text: str | bytes, what: str) -> M:
    """JSON text as `model`, its types read as the OpenAPI document (JSON Schema) states them: 2.0 is an
    integer, true and "2" are not (pydantic's lax mode takes all three, its strict mode none)."""
    try:
        data = json.loads(text, parse_float=_number)
    except ValueError as e:
        raise FieldError(422, f"bad {what}: not JSON ({e})", what) from e
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        raise invalid(e, what) from e


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def _safe_stem(name: str) -> str:
    """The file name without its suffix, reduced to characters safe in a path: the image's id."""
    stem = _UNSAFE.sub("_", Path(name).stem).strip("._")[:100]
    return stem or "image"


def resolve_shards(shards: list[str], settings: Settings, dest: Path) -> list[JobInput]:
    if len(shards) > settings.max_files:
        raise HTTPException(413, f"too many shards: at most {settings.max_files} per job")
    inputs = [_fetch(raw, settings, dest / str(n)) if _is_url(raw) else _server_shard(raw, settings)
              for n, raw in enumerate(shards)]
    total = sum(i.path.stat().st_size for i in inputs)
    if total > settings.max_upload_bytes:
        raise HTTPException(413, f"shards total {total} bytes, over the limit of {settings.max_upload_bytes} bytes")
    return inputs


def _is_url(raw: str) -> bool:
    return "://" in raw


def _server_shard(raw: str, settings: Settings) -> JobInput:
    if not settings.data_roots:
        raise HTTPException(403, "shards on the server are disabled here (no data roots configured)")
    if "\0" in raw or not raw.strip():
        raise FieldError(422, f"bad shard path {raw!r}", "shards")
    roots = [Path(r).resolve() for r in settings.data_roots]
    candidates = [Path(raw)] if Path(raw).is_absolute() else [root / raw for root in roots]
    # resolve() follows `..` and every symlink: what counts is where the file really is.
    inside = [real for real in (c.resolve() for c in candidates) if any(real.is_relative_to(r) for r in roots)]
    if not inside:
        raise HTTPException(403, f"shard {raw!r} is outside the data roots this server may read")
    path = next((p for p in inside if p.is_file()), None)
    if path is None:
        raise HTTPException(404, f"shard {raw!r} not found under the data roots")
    return _checked_tar(path, raw)


def _fetch(url: str, settings: Settings, dest: Path) -> JobInput:
    if not url.startswith(("http://", "https://")):
        raise FieldError(422, f"unsupported shard URL {url!r}: only http(s) (for S3, a presigned URL)", "shards")
    if not settings.allow_url_shards:
        raise HTTPException(403, "shard URLs are disabled on this server")
    dest.mkdir(parents=True)
    path = dest / "shard.tar"
    try:
        with httpx.stream("GET", url, timeout=DOWNLOAD_TIMEOUT_S) as response, path.open("wb") as out:
            response.raise_for_status()
            for block in response.iter_bytes():
                if out.tell() + len(block) > settings.max_upload_bytes:
                    raise HTTPException(413, f"shard {url} is larger than {settings.max_upload_bytes} bytes")
                out.write(block)
    except httpx.HTTPError as e:
        raise FieldError(422, f"cannot download shard {url}: {e}", "shards") from e
    return _checked_tar(path, url)


def _checked_tar(path: Path, name: str) -> JobInput:
    with path.open("rb") as f:
        head = f.read(512)
    if sniff(head) != "tar":
        raise HTTPException(415, f"{name}: not a .tar shard (content check)")
    return JobInput(path, name, "tar")
