"""/v1/jobs/{id}/attributions: a job's word -> patch maps (job option `attributions`), per image as the
safetensors file the decoder wrote (shared.attributions), and per caption as JSON for the viewer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse

from latent_verbalizer.services.gateway.deps import Job, gateway, require_succeeded
from latent_verbalizer.services.gateway.schemas import AttributionMap, errors
from latent_verbalizer.shared.attributions import attribution_path, map_key, read_attributions
from latent_verbalizer.shared.jobs import JobRecord

router = APIRouter(prefix="/v1", tags=["attributions"], responses=errors(503))

Image = Annotated[str, Query(min_length=1, max_length=1000, description="the image's id, as in the results")]


@router.get("/jobs/{job_id}/attributions", summary="An image's word -> patch maps (safetensors)",
            description="Every caption token's map over its layer's patch grid, fp16 tensors `layer_<i>` and "
                        "`region_<k>.layer_<i>` [tokens, gh, gw] with the grid, input box and tokens in the "
                        "metadata (read it with shared.attributions.read_attributions).",
            response_class=FileResponse,
            responses={200: {"description": "the image's safetensors file",
                             "content": {"application/octet-stream": {}}}, **errors(404, 409, 422)})
def get_attributions(request: Request, job: Job, image: Image) -> FileResponse:
    return FileResponse(_file(request, job, image), media_type="application/octet-stream")


@router.get("/jobs/{job_id}/attributions/map", response_model=AttributionMap, responses=errors(404, 409, 422),
            summary="One caption's word -> patch maps (JSON)")
def get_attribution_map(
    request: Request, job: Job, image: Image,
    layer: Annotated[int, Query(ge=0, le=1000, description="the caption's vision layer")],
    region: Annotated[int | None, Query(ge=0, le=1000, description="a region's index; absent: the whole image")] = None,
) -> AttributionMap:
    a = read_attributions(_file(request, job, image))
    try:
        maps = a.map(layer, region)
    except KeyError as e:
        raise HTTPException(404, e.args[0]) from None
    rows = np.round(maps.astype(np.float64).reshape(len(maps), -1), 6).tolist()
    return AttributionMap(image=image, layer=layer, region=region, grid=list(a.grid), input_box=list(a.input_box),
                          tokens=a.tokens[map_key(layer, region)],
                          maps=rows, method=a.method)


def _file(request: Request, job: JobRecord, image: str) -> Path:
    """The image's attribution file, or why there is none (409 before the job succeeded, else 404)."""
    require_succeeded(job)
    if not job.options.attributions:
        raise HTTPException(404, "no attributions: the job ran without the option `attributions`")
    path = attribution_path(gateway(request).store.attributions(job.id), image)
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a name the file system refuses (too long, a NUL byte) is no image's
        found = False
    if not found:
        raise HTTPException(404, f"no attributions for image {image!r} (the ids are the results' `id`; an image"
                                 " that failed has none)")
    return path
