"""The artifact store: a directory tree on a volume every service mounts (LV_ARTIFACT_DIR). Tensors
and images travel between stages through it, never through Redis.

    jobs/<id>/inputs/chunk-00000.tar            a chunk's images as submitted (ids, sources, bytes)
    jobs/<id>/latents/chunk-00000.safetensors   encoder output: fp16 [L, n, Q-1, D] + the chunk's items
    jobs/<id>/image_embeddings/chunk-00000.safetensors   encoder output with grounding: fp16 [n, E]
    jobs/<id>/region_latents/chunk-00000.safetensors     encoder output with regions: fp16 [L, n, R, Q-1, D]
    jobs/<id>/pool_attention/chunk-00000.safetensors     encoder output with attributions: fp16 [L, n, 1+R, Q-1, T]
    jobs/<id>/grounding/chunk-00000.safetensors decoder output with grounding: image [n, E], text [n, L, E]
    jobs/<id>/captions/chunk-00000.jsonl        decoder output: one ImageResult line per image
    jobs/<id>/labels/chunk-00000.jsonl          categorizer output: the same lines with phrases
    jobs/<id>/results.jsonl, summary.json, figure.png, entropy.png, distribution.csv    job outputs
    jobs/<id>/attributions/<image id>.safetensors   job output with attributions (shared.attributions),
                                                    written by the decoder task of the image's chunk

Every write goes to a temporary file renamed into place: a reader sees a whole file or none, and a
retried task replaces its earlier output instead of adding to it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from latent_verbalizer.shared.images import ImageItem

if TYPE_CHECKING:  # torch is imported only by the workers that handle tensors
    import torch

INTERMEDIATE = ("uploads", "inputs", "latents", "image_embeddings", "region_latents", "region_mask", "pool_attention",
                "null_latents", "grounding", "captions", "labels")


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def output(self, job_id: str, name: str) -> Path:
        """A job output file (results.jsonl, summary.json, figure.png, ...)."""
        return self.job_dir(job_id) / name

    def attributions(self, job_id: str) -> Path:
        """The directory of a job's word -> patch attribution files (one per image)."""
        return self.job_dir(job_id) / "attributions"

    def scratch(self, job_id: str) -> Path:
        """Where the gateway unpacks a job's uploads while it splits them into chunks."""
        path = self.job_dir(job_id) / "uploads"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # --- chunk inputs: a tar of items.json + one member per image ---

    def write_inputs(self, job_id: str, chunk: int, items: list[ImageItem]) -> None:
        index = [{"id": i.id, "source": i.source, "meta": i.meta, "error": i.error} for i in items]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            _add(tar, "items.json", json.dumps(index).encode())
            for n, item in enumerate(items):
                _add(tar, f"data/{n}", item.data)
        write_atomic(self._chunk(job_id, "inputs", chunk, ".tar"), buf.getvalue())

    def read_inputs(self, job_id: str, chunk: int) -> list[ImageItem]:
        with tarfile.open(self._chunk(job_id, "inputs", chunk, ".tar")) as tar:
            index = json.loads(tar.extractfile("items.json").read())
            return [ImageItem(data=tar.extractfile(f"data/{n}").read(), **entry) for n, entry in enumerate(index)]

    # --- latents: safetensors, fp16, with the chunk's item list as metadata ---

    def write_latents(self, job_id: str, chunk: int, latents: torch.Tensor | None, info: dict) -> None:
        from safetensors.torch import save

        tensors = {} if latents is None else {"latents": latents.detach().to("cpu").half().contiguous()}
        write_atomic(self._chunk(job_id, "latents", chunk, ".safetensors"),
                     save(tensors, metadata={"info": json.dumps(info)}))

    def read_latents(self, job_id: str, chunk: int) -> tuple[torch.Tensor | None, dict]:
        from safetensors import safe_open

        with safe_open(self._chunk(job_id, "latents", chunk, ".safetensors"), "pt") as f:
            info = json.loads(f.metadata()["info"])
            latents = f.get_tensor("latents") if "latents" in f.keys() else None
        return latents, info

    def read_latents_info(self, job_id: str, chunk: int) -> dict:
        """The latents' info alone (the chunk's items, with their errors), without reading the tensor or
        importing torch."""
        from safetensors import safe_open

        with safe_open(self._chunk(job_id, "latents", chunk, ".safetensors"), "numpy") as f:
            return json.loads(f.metadata()["info"])

    # --- other per-chunk tensors (parts of services.families.base.Encoded | grounding): fp16, masks bool ---

    def write_tensors(self, job_id: str, kind: str, chunk: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
        from safetensors.torch import save

        tensors = {k: (v.half() if v.is_floating_point() else v).detach().to("cpu").contiguous()
                   for k, v in tensors.items()}
        write_atomic(self._chunk(job_id, kind, chunk, ".safetensors"),
                     save(tensors, metadata={"info": json.dumps(info)}))

    def write_no_tensors(self, job_id: str, kind: str, chunk: int, info: dict) -> None:
        """The file `write_tensors` writes for a chunk none of whose images has such tensors: the info alone
        (no torch needed: the gateway writes it for a chunk it gives up on)."""
        from safetensors.numpy import save

        write_atomic(self._chunk(job_id, kind, chunk, ".safetensors"), save({}, metadata={"info": json.dumps(info)}))

    def read_tensors(self, job_id: str, kind: str, chunk: int) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors import safe_open

        with safe_open(self._chunk(job_id, kind, chunk, ".safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["info"])

    # --- per-chunk JSON lines (kind: captions | labels) ---

    def write_lines(self, job_id: str, kind: str, chunk: int, lines: Iterable[str]) -> None:
        write_atomic(self._chunk(job_id, kind, chunk, ".jsonl"), "".join(f"{line}\n" for line in lines).encode())

    def read_lines(self, job_id: str, kind: str, chunk: int) -> list[str]:
        return self._chunk(job_id, kind, chunk, ".jsonl").read_text().splitlines()

    # --- job outputs ---

    def write_results(self, job_id: str, parts: Iterable[tuple[str, int]], missing_ok: bool = False) -> Path:
        """results.jsonl: the lines of each (kind, chunk) part, in order (`missing_ok`: skip a part with no file)."""
        path = self.output(job_id, "results.jsonl")
        tmp = _tmp(path)
        with tmp.open("wb") as out:
            for kind, chunk in parts:
                try:
                    with self._chunk(job_id, kind, chunk, ".jsonl").open("rb") as f:
                        shutil.copyfileobj(f, out)
                except FileNotFoundError:
                    if not missing_ok:
                        tmp.unlink()
                        raise
        os.replace(tmp, path)
        return path

    def publish(self, job_id: str, files: Iterable[Path]) -> None:
        """Move finished files (written elsewhere on the same volume) into the job's directory."""
        for f in files:
            os.replace(f, self.output(job_id, f.name))

    def staging(self, job_id: str) -> Path:
        """A fresh directory on the store's volume for files that `publish` moves in when complete."""
        path = self.job_dir(job_id) / f".staging-{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        return path

    # --- clean-up ---

    def delete_intermediates(self, job_id: str) -> None:
        for name in INTERMEDIATE:
            shutil.rmtree(self.job_dir(job_id) / name, ignore_errors=True)
        for staging in self.job_dir(job_id).glob(".staging-*"):
            shutil.rmtree(staging, ignore_errors=True)

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def job_ids(self) -> list[str]:
        jobs = self.root / "jobs"
        return [p.name for p in jobs.iterdir() if p.is_dir()] if jobs.is_dir() else []

    def check_writable(self) -> None:
        """Raise OSError unless a file can be written and removed at the store's root."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = _tmp(self.root / "probe")
        probe.write_bytes(b"ok")
        probe.unlink()

    def _chunk(self, job_id: str, kind: str, chunk: int, suffix: str) -> Path:
        return self.job_dir(job_id) / kind / f"chunk-{chunk:05d}{suffix}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)
