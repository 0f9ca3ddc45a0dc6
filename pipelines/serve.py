"""`segnet serve`: a registered model behind HTTP with Ray Serve, bound to 127.0.0.1 unless told otherwise.

POST /predict    a PNG/JPEG body -> a label PNG (class indices), or `?format=json`: per-class pixel counts
GET  /healthz    status and the version being served
GET  /model      name, version, alias, test metrics, data identity
POST /reload     look the alias up again; a new version is loaded first and then replaces the old one, so
                 no request fails while the alias moves (`--poll S` does this every S seconds)
"""

import asyncio
import io
import threading
import time

import numpy as np
import pandas as pd
from PIL import Image
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from pipelines import registry
from pipelines.pyfunc_model import decode_image
from segnet import CLASSES
from segnet.errors import SegNetError

MAX_BODY = 20 * 2**20  # bytes: a 360x480 PNG is about 300 kB
CONTENT_TYPES = ("image/png", "image/jpeg", "application/octet-stream")


def refuse(status: int, reason: str) -> PlainTextResponse:
    return PlainTextResponse(reason.replace("\n", " ") + "\n", status_code=status)


@serve.deployment(max_ongoing_requests=32)
class SegNetServer:
    def __init__(self, uri: str, ref: str, max_batch_size: int = 4, batch_wait_s: float = 0.01, poll_s=0.0):
        self.uri, self.ref = uri, ref
        self.current = self.load()  # (pyfunc, info): replaced as one object, read once per batch
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_s)
        if poll_s > 0:
            threading.Thread(target=self.poll, args=(poll_s,), daemon=True).start()

    def load(self, known: str | None = None):
        """The version the reference names now, loaded; None when it is still `known`."""
        info = registry.show(self.uri, self.ref)
        if info["version"] == known:
            return None
        model = registry.load(self.uri, f"{info['name']}/{info['version']}")
        return model, {**info, "ref": self.ref}

    def reload(self) -> dict:
        new = self.load(known=self.current[1]["version"])
        if new is not None:
            self.current = new
        return self.current[1]

    def poll(self, seconds: float) -> None:
        while True:
            time.sleep(seconds)
            try:
                self.reload()
            except SegNetError as e:  # the registry is down or the alias is gone: keep serving
                print(f"segnet serve: reload failed, still serving v{self.current[1]['version']}: {e}")

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def predict_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        model, info = self.current
        labels = await asyncio.to_thread(model.predict, pd.DataFrame({"image": images}))
        return [(label, info["version"]) for label in labels]

    async def __call__(self, request: Request) -> Response:
        route = (request.method, request.url.path.rstrip("/"))
        if route == ("POST", "/predict"):
            return await self.predict(request)
        if route == ("GET", "/healthz"):
            info = self.current[1]
            return JSONResponse({"status": "ok", "name": info["name"], "version": info["version"]})
        if route == ("GET", "/model"):
            return JSONResponse(self.current[1])
        if route == ("POST", "/reload"):
            try:
                return JSONResponse(await asyncio.to_thread(self.reload))
            except SegNetError as e:
                return refuse(503, f"reload failed, still serving v{self.current[1]['version']}: {e}")
        return refuse(404, f"no route {request.method} {request.url.path}: see POST /predict, GET /healthz")

    async def predict(self, request: Request) -> Response:
        fmt = request.query_params.get("format", "png")
        if fmt not in ("png", "json"):
            return refuse(400, f"format={fmt!r}: expected png or json")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in CONTENT_TYPES:
            expected = ", ".join(CONTENT_TYPES)
            return refuse(415, f"content type {ctype or 'none'!r}: send the image as {expected}")
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            return refuse(413, f"body of {request.headers['content-length']} bytes is over {MAX_BODY} bytes")
        body = bytearray()
        async for chunk in request.stream():  # a body without a length stops being read at the limit
            body += chunk
            if len(body) > MAX_BODY:
                return refuse(413, f"body is over {MAX_BODY} bytes")
        if not body:
            return refuse(400, "empty body: send a PNG or JPEG image")
        try:
            image = decode_image(bytes(body), "the request body")
        except SegNetError as e:
            return refuse(400, str(e))
        labels, version = await self.predict_batch(image)
        headers = {"X-Model-Version": version}
        if fmt == "json":
            counts = np.bincount(labels.ravel(), minlength=len(CLASSES))
            h, w = labels.shape
            body = {
                "version": version,
                "height": h,
                "width": w,
                "counts": {name: int(n) for name, n in zip(CLASSES, counts)},
            }
            return JSONResponse(body, headers=headers)
        png = io.BytesIO()
        Image.fromarray(labels).save(png, format="PNG")
        return Response(png.getvalue(), media_type="image/png", headers=headers)


def start(
    uri: str,
    ref: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    max_batch_size: int = 4,
    batch_wait_ms: float = 10,
    poll_s: float = 0,
    address: str | None = None,
    cpus_per_replica: float = 1,
) -> str:
    """Deploy the model (replicas take a GPU each when the cluster has them; torch in a replica uses as
    many threads as it has CPUs); returns the base URL."""
    import ray

    from data_prep.shards import init_ray

    info = registry.show(uri, ref)  # an unknown model or alias fails here, in one line, not in a replica
    init_ray(address)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= replicas else 0
    serve.start(http_options={"host": host, "port": port})
    resources = {"num_gpus": gpus, "num_cpus": cpus_per_replica}
    app = SegNetServer.options(num_replicas=replicas, ray_actor_options=resources)
    app = app.bind(uri, ref, max_batch_size, batch_wait_ms / 1000, poll_s)
    serve.run(app, name="segnet", route_prefix="/")
    print(f"serving {info['name']} v{info['version']} ({ref}) at http://{host}:{port}/predict")
    return f"http://{host}:{port}"
