"""`segnet serve`: a registered model behind HTTP with Ray Serve, bound to 127.0.0.1 unless told otherwise.

POST /predict    a PNG/JPEG body -> a label PNG (class indices), or `?format=json`: per-class pixel counts;
                 `?mc_samples=N` (a model trained with dropout): Bayesian SegNet's labels from N dropout
                 samples, `&uncertainty=1` the per-pixel uncertainty instead (a grey PNG: value / 255 is
                 the normalised predictive entropy), or in the JSON (its mean and that PNG in base64)
GET  /          a page for people: choose or drop an image, see its labels over it with a legend and each
                 class's share of the pixels, and for a model with dropout its uncertainty map beside it
GET  /healthz    status and the version being served
GET  /model      name, version, alias, test metrics, data identity
POST /reload     look the alias up again; a new version is loaded first and then replaces the old one, so
                 no request fails while the alias moves (`--poll S` does this every S seconds)

Each replica admits a request only while the pixels of the images it holds stay within its budget
(`max_pixels_in_flight`; the image's size is read from its header, before decoding): an image larger than
the whole budget gets 413 at once; one that finds the budget full waits up to `admit_wait_s`, then gets 503
with a Retry-After header; a request for N Monte Carlo samples counts N times its image's pixels. A
request's memory is bounded by its pixels (docs/serving.md, "Memory per request"). On SIGTERM or Ctrl-C
the process stops taking requests, finishes those in flight and exits 0.
"""

import asyncio
import base64
import contextlib
import io
import json
import math
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from ray import serve
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from data_prep.shards import dataset_of
from pipelines.config import ServeConfig
from pipelines.core.plots import grey_levels
from pipelines.tracking import registry
from pipelines.tracking.pyfunc_model import MAX_PIXELS, decode_image, open_image
from segnet.bayesian import MAX_MC_SAMPLES, MC_BATCH, check_samples
from segnet.errors import SegNetError

MAX_BODY = 20 * 2**20  # bytes: a 360x480 PNG is about 300 kB
CONTENT_TYPES = ("image/png", "image/jpeg", "application/octet-stream")
APP = "segnet"
DRAIN_S = 120  # on a stop, how long a replica may take to finish the requests it holds
PAGE = Path(__file__).with_name("serve_page.html")  # GET /: one file, no external asset
PAGE_POLICY = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob:"
ADMIT_WAIT_S = 10.0  # how long a request waits for room in its replica's pixel budget before a 503


def refuse(status: int, reason: str, headers: dict | None = None) -> PlainTextResponse:
    return PlainTextResponse(reason.replace("\n", " ") + "\n", status_code=status, headers=headers)


class PixelBudget:
    """The pixels of the images a replica holds at once (decoded, predicted, encoded), at most `limit`;
    one event loop only (the replica's), so no lock beyond asyncio's."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self.freed = asyncio.Condition()

    async def take(self, pixels: int, wait_s: float) -> bool:
        """Hold `pixels` once they fit, waiting up to `wait_s`; False when they did not fit in time."""
        async with self.freed:
            try:
                await asyncio.wait_for(self.freed.wait_for(lambda: self.held + pixels <= self.limit), wait_s)
            except TimeoutError:
                return False
            self.held += pixels
            return True

    async def give(self, pixels: int) -> None:
        async with self.freed:
            self.held -= pixels
            self.freed.notify_all()


@serve.deployment(max_ongoing_requests=32, graceful_shutdown_timeout_s=DRAIN_S)
class SegNetServer:
    def __init__(
        self,
        uri: str,
        ref: str,
        max_batch_size: int = 4,
        batch_wait_s: float = 0.01,
        poll_s=0.0,
        max_pixels: int = MAX_PIXELS,
        max_pixels_in_flight: int = 2 * MAX_PIXELS,
        admit_wait_s: float = ADMIT_WAIT_S,
        mc_batch: int = MC_BATCH,
        max_mc_samples: int = MAX_MC_SAMPLES,
    ):
        self.uri, self.ref = uri, ref
        self.max_pixels, self.admit_wait_s = max_pixels, admit_wait_s
        self.mc_batch, self.max_mc_samples = mc_batch, max_mc_samples
        self.budget = PixelBudget(max_pixels_in_flight)
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
        python_model = model.unwrap_python_model()
        meta = getattr(python_model, "meta", {})  # models logged before it kept no meta
        dataset = dataset_of(meta, f"models:/{info['name']}/{info['version']}")
        named = {"dataset": dataset.name, "classes": list(dataset.classes), "colors": list(dataset.colors)}
        dropout = bool(getattr(python_model, "dropout", False))
        return model, {**info, "ref": self.ref, **named, "dropout": dropout}

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
    async def predict_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, dict]]:
        model, info = self.current
        labels = await asyncio.to_thread(model.predict, pd.DataFrame({"image": images}))
        return [(label, info) for label in labels]

    async def __call__(self, request: Request) -> Response:
        route = (request.method, request.url.path.rstrip("/"))
        if route == ("POST", "/predict"):
            return await self.predict(request)
        if route == ("GET", ""):
            return HTMLResponse(page(self.current[1]), headers={"Content-Security-Policy": PAGE_POLICY})
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
        return refuse(
            404, f"no route {request.method} {request.url.path}: see GET /, POST /predict, GET /healthz"
        )

    def sampling(self, request: Request) -> tuple[int, bool] | Response:
        """(mc_samples, uncertainty) of a request's query, or the 400 that refuses them: a count that is
        not 1 to max_mc_samples, or over 1 for a model without dropout."""
        text, flag = (request.query_params.get(k, v) for k, v in (("mc_samples", "1"), ("uncertainty", "0")))
        if not text.isdigit():
            return refuse(400, f"mc_samples={text!r}: expected a whole number, 1 to {self.max_mc_samples}")
        if flag not in ("0", "1", "false", "true"):
            return refuse(400, f"uncertainty={flag!r}: expected 1 or 0")
        samples, uncertainty = int(text), flag in ("1", "true")
        python_model, version = self.current[0].unwrap_python_model(), self.current[1]["version"]
        if (samples > 1 or uncertainty) and not hasattr(python_model, "sampling"):
            return refuse(400, f"v{version} was logged before Monte Carlo sampling: it takes no mc_samples")
        dropout = getattr(python_model, "dropout", False)
        try:
            check_samples(samples, self.max_mc_samples, dropout, f"v{version}")
        except SegNetError as e:
            return refuse(400, str(e))
        return samples, uncertainty

    async def predict(self, request: Request) -> Response:
        fmt = request.query_params.get("format", "png")
        if fmt not in ("png", "json"):
            return refuse(400, f"format={fmt!r}: expected png or json")
        sampling = self.sampling(request)
        if isinstance(sampling, Response):
            return sampling
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
            img = open_image(bytes(body), "the request body", self.max_pixels)  # the header only
        except SegNetError as e:
            return refuse(400, str(e))
        pixels = img.width * img.height * sampling[0]  # each Monte Carlo sample counts the image once
        if pixels > self.budget.limit:
            times = f" x {sampling[0]} samples" if sampling[0] > 1 else ""
            return refuse(
                413,
                f"the image has {img.width}x{img.height} pixels{times}, over this server's budget of "
                f"{self.budget.limit:,} pixels in flight: send a smaller image or ask fewer samples",
            )
        if not await self.budget.take(pixels, self.admit_wait_s):
            retry = math.ceil(self.admit_wait_s)
            reason = (
                f"busy: {self.budget.held:,} of {self.budget.limit:,} pixels in flight; retry in {retry} s"
            )
            return refuse(503, reason, headers={"Retry-After": str(retry)})
        try:
            return await self.predict_admitted(img, fmt, *sampling)
        finally:
            await self.budget.give(pixels)

    async def predict_admitted(self, img: Image.Image, fmt: str, samples: int, uncertainty: bool) -> Response:
        try:
            image = await asyncio.to_thread(decode_image, img, "the request body")
        except SegNetError as e:
            return refuse(400, str(e))
        entropy = None
        if samples > 1 or uncertainty:  # a batch of its own: the image repeated into samples
            model, info = self.current
            params = {"mc_samples": samples, "mc_batch": self.mc_batch, "uncertainty": uncertainty}
            frame = pd.DataFrame({"image": [image]})
            labels = (await asyncio.to_thread(model.predict, frame, params=params))[0]
            labels, entropy = (labels["labels"], labels["uncertainty"]) if uncertainty else (labels, None)
        else:
            labels, info = await self.predict_batch(image)  # the classes of the version that predicted
        del image
        headers = {"X-Model-Version": info["version"], "X-MC-Samples": str(samples)}
        if fmt == "json":
            return JSONResponse(
                await asyncio.to_thread(report, labels, entropy, info, samples), headers=headers
            )
        picture = labels if entropy is None else grey_levels(entropy)
        return Response(await asyncio.to_thread(png, picture), media_type="image/png", headers=headers)


def report(labels: np.ndarray, entropy: np.ndarray | None, info: dict, samples: int) -> dict:
    """`?format=json`: per-class pixel counts; with the uncertainty, its mean and its grey PNG (base64)."""
    classes = info["classes"]
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    h, w = labels.shape
    body = {
        "version": info["version"],
        "height": h,
        "width": w,
        "counts": {name: int(n) for name, n in zip(classes, counts)},
        "mc_samples": samples,
    }
    if entropy is not None:
        encoded = base64.b64encode(png(grey_levels(entropy))).decode()
        body["uncertainty"] = {"mean": float(entropy.mean()), "png": encoded}
    return body


def page(info: dict) -> str:
    """GET /: serve_page.html with the served model's name, version, classes, colours and dropout."""
    model = {k: info[k] for k in ("name", "version", "dataset", "classes", "colors", "dropout")}
    blob = json.dumps(model).replace("<", "\\u003c")  # no `</script>` from a class name
    return PAGE.read_text().replace("/*MODEL*/null", blob)


def png(labels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(labels).save(out, format="PNG")
    return out.getvalue()


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
    max_pixels: int = MAX_PIXELS,
    max_pixels_in_flight: int = 2 * MAX_PIXELS,
    admit_wait_s: float = ADMIT_WAIT_S,
    mc_batch: int = MC_BATCH,
    max_mc_samples: int = MAX_MC_SAMPLES,
) -> str:
    """Deploy the model (replicas take a GPU each when the cluster has them; torch in a replica uses as
    many threads as it has CPUs); returns the base URL. `max_pixels` per image (at most the registered
    model's own limit, MAX_PIXELS), `max_pixels_in_flight` per replica. Called in the main thread, it
    makes SIGTERM and SIGINT a clean stop (see `stop_on_signal`)."""
    import ray

    from data_prep.shards import init_ray

    if not 0 < max_pixels <= MAX_PIXELS:
        raise SegNetError(f"max_pixels {max_pixels:,}: expected 1 to {MAX_PIXELS:,} (the model's own limit)")
    if max_pixels_in_flight < 1 or admit_wait_s < 0:
        raise SegNetError(
            f"max_pixels_in_flight {max_pixels_in_flight:,} and admit_wait_s {admit_wait_s}: expected at "
            "least 1 pixel and 0 s"
        )
    info = registry.show(uri, ref)  # an unknown model or alias fails here, in one line, not in a replica
    init_ray(address)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= replicas else 0
    serve.start(http_options={"host": host, "port": port})
    resources = {"num_gpus": gpus, "num_cpus": cpus_per_replica}
    app = SegNetServer.options(num_replicas=replicas, ray_actor_options=resources)
    app = app.bind(
        uri, ref, max_batch_size, batch_wait_ms / 1000, poll_s, max_pixels, max_pixels_in_flight,
        admit_wait_s, mc_batch, max_mc_samples,
    )  # fmt: skip
    serve.run(app, name=APP, route_prefix="/")
    if threading.current_thread() is threading.main_thread():
        stop_on_signal()
    print(f"serving {info['name']} v{info['version']} ({ref}) at http://{host}:{port}/predict")
    return f"http://{host}:{port}"


@contextlib.contextmanager
def serving(cfg: ServeConfig):
    """The model served with the settings of `cfg` (`segnet serve`, `bench serve`), shut down on leaving."""
    from pipelines.tracking.runs import tracking_uri

    url = start(
        tracking_uri(cfg.mlflow_uri),
        cfg.model,
        cfg.host,
        cfg.port,
        cfg.replicas,
        cfg.max_batch_size,
        cfg.batch_wait_ms,
        cfg.poll,
        cfg.address,
        cfg.cpus_per_replica,
        cfg.max_pixels,
        cfg.max_pixels_in_flight,
        cfg.admit_wait_s,
        cfg.mc_batch,
        cfg.max_mc_samples,
    )
    try:
        yield url
    finally:
        shutdown()


def stop_on_signal() -> None:
    """SIGTERM and SIGINT: the app is deleted first (Serve's proxy stops routing to it; each replica finishes
    the requests it holds, up to its graceful_shutdown_timeout_s), then the process ends with status 0: the
    exception unwinds the caller's wait (its `finally: serve.shutdown()` finds nothing left). serve.shutdown
    alone stops the proxy at once and cuts the connections of requests in flight."""

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal does not cut the shutdown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"segnet serve: {signal.Signals(signum).name}: finishing the requests in flight, then stopping")
        serve.delete(APP)
        shutdown()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def shutdown(timeout_s: float = 60) -> None:
    """serve.shutdown() without its console line: it calls the controller's graceful_shutdown and waits for
    the controller to kill itself, and Ray then prints `(raylet) Task ServeController.graceful_shutdown
    failed ... will be retried` for the call cut short. Here the controller is told not to wait; once the
    state API says it is dead (no call to it pending), serve.shutdown() has nothing left to do."""
    import ray
    from ray.serve.context import _get_global_client
    from ray.util.state import get_actor

    client = _get_global_client(raise_if_no_controller_running=False) if ray.is_initialized() else None
    if client is None:  # nothing served: stopped already (by a signal, before `serving` leaves)
        return
    controller = client._controller
    ray.get(controller.graceful_shutdown.remote(wait=False))
    address = ray.get_runtime_context().gcs_address  # this Ray's, where several run on one machine
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = get_actor(controller._actor_id.hex(), address=address)
        if state is None or state.state == "DEAD":
            break
        time.sleep(0.5)
    serve.shutdown()
