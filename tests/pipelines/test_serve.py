"""`segnet serve` on a real Ray Serve over real HTTP: predictions, reports, bad requests, an alias move, and
the page for people in a real browser."""

import base64
import io
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import requests
import torch
from PIL import Image

from pipelines.serve import MAX_BODY
from pipelines.tracking import registry, runs
from tests.helpers import free_port, mlflow_store

pytestmark = pytest.mark.slow
NAME = "serve-test"
BUDGET = 30_000_000  # pixels in flight per replica: under the 40 M per image, so that 413 can be seen


@pytest.fixture(scope="module")
def server(ray_local, register_seeded, tmp_path_factory):
    from ray import serve

    from pipelines.serve import start

    tmp = tmp_path_factory.mktemp("serve")
    uri = mlflow_store(tmp / "mlflow.db")
    register_seeded(uri, NAME, 1, 0.5, tmp)  # champion
    register_seeded(uri, NAME, 2, 0.4, tmp)  # not better: champion stays on v1
    url = start(uri, f"{NAME}@champion", port=free_port(), max_batch_size=4, max_pixels_in_flight=BUDGET)
    yield uri, url
    serve.shutdown()


@pytest.fixture(scope="module")
def image(camvid_dir) -> bytes:
    return sorted((camvid_dir / "test").iterdir())[0].read_bytes()


def labels_of(uri: str, version: str, image: bytes) -> np.ndarray:
    """In this process, with the replica's one thread (Ray sets it): the same sums, the same labels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return registry.load(uri, f"{NAME}/{version}").predict(pd.DataFrame({"image": [image]}))[0]
    finally:
        torch.set_num_threads(threads)


def post(url: str, data: bytes, ctype: str = "image/png", fmt: str = "png") -> requests.Response:
    headers = {"Content-Type": ctype}
    return requests.post(f"{url}/predict?format={fmt}", data=data, headers=headers, timeout=60)


def png_labels(r: requests.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(r.content)))


def test_predict_returns_the_models_labels_as_a_png_at_the_images_size(server, image):
    uri, url = server
    r = post(url, image)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    labels = png_labels(r)
    assert labels.shape == (360, 480)
    assert np.array_equal(labels, labels_of(uri, "1", image))
    assert r.headers["x-model-version"] == "1"


def test_json_format_counts_every_pixel_once_per_class(server, image):
    _, url = server
    expected = np.bincount(png_labels(post(url, image)).ravel(), minlength=11)
    r = post(url, image, fmt="json")
    assert r.status_code == 200
    body = r.json()
    assert list(body["counts"].values()) == expected.tolist()
    assert (body["height"], body["width"], body["version"]) == (360, 480, "1")


def test_healthz_and_model_report_version_alias_metrics_and_data(server):
    _, url = server
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
    model = requests.get(f"{url}/model", timeout=10).json()
    assert (model["version"], model["ref"], model["aliases"]) == ("1", f"{NAME}@champion", ["champion"])
    assert model["metrics"]["test_miou"] == 0.5
    assert model["data_manifest_sha256"] == "0" * 64


def test_concurrent_clients_all_get_the_same_labels(server, image):
    _, url = server
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(url, image), range(24)))
    assert [r.status_code for r in responses] == [200] * 24
    first = png_labels(responses[0])
    assert all(np.array_equal(png_labels(r), first) for r in responses)


def _png(size, mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, format="PNG")
    return out.getvalue()


BAD = {
    "not an image": (b"this is text, not a picture", "image/png", 400, "cannot be decoded"),
    "pixel bomb": (_png((8000, 6000), "1"), "image/png", 400, "over the limit"),
    # made in the test (fixtures): 83 bytes declaring 30000x30000; a real PNG cut short
    "decompression bomb": (lambda bomb, image: bomb(30000, 30000), "image/png", 400, "over the limit"),
    "truncated png": (lambda bomb, image: image[:5000], "image/png", 400, "cannot be decoded"),
    "wrong content type": (b"{}", "application/json", 415, "content type"),
    "empty body": (b"", "image/png", 400, "empty body"),
    "oversized body": (b"\0" * (MAX_BODY + 1), "image/png", 413, "over"),
    "over the budget in flight": (_png((6000, 6000), "1"), "image/png", 413, "budget of 30,000,000 pixels"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_gets_a_4xx_with_one_line_and_the_server_keeps_serving(
    server, image, png_declaring, case
):
    _, url = server
    data, ctype, status, reason = BAD[case]
    data = data(png_declaring, image) if callable(data) else data
    r = post(url, data, ctype)
    assert r.status_code == status
    assert reason in r.text and r.text.count("\n") == 1
    assert post(url, image).status_code == 200


def test_moving_the_alias_under_load_fails_no_request(server, image):
    uri, url = server
    v2 = labels_of(uri, "2", image)
    stop = threading.Event()

    def client() -> list[tuple]:
        results = []
        while not stop.is_set():
            r = post(url, image)
            results.append((r.status_code, r.headers.get("x-model-version"), r.content))
        return results

    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client) for _ in range(4)]
        try:
            time.sleep(2)
            runs.client(uri).set_registered_model_alias(NAME, "champion", "2")
            reloaded = requests.post(f"{url}/reload", timeout=120).json()
            time.sleep(2)
        finally:
            stop.set()
        results = [r for c in clients for r in c.result()]  # a client that raised (a reset) fails here
    assert reloaded["version"] == "2"
    assert [status for status, _, _ in results] == [200] * len(results)
    assert {version for _, version, _ in results} == {"1", "2"}
    after = post(url, image)
    assert after.headers["x-model-version"] == "2"
    assert np.array_equal(png_labels(after), v2)


def test_bench_serve_reports_throughput_latency_and_errors_with_a_plot(server, camvid_dir, tmp_path):
    from pipelines.bench.bench import bench_serve

    image = sorted((camvid_dir / "test").iterdir())[0]
    figures = bench_serve(server[1], image, clients=2, requests_per_client=3, plot=tmp_path / "latency.png")
    assert (figures["requests"], figures["errors"]) == (6, 0)
    assert 0 < figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_a_chunked_body_over_the_limit_is_refused(server, image):
    _, url = server
    chunks = (b"\0" * 2**20 for _ in range(MAX_BODY // 2**20 + 2))  # no Content-Length: sent chunked
    r = requests.post(f"{url}/predict", data=chunks, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 413 and "over" in r.text
    assert post(url, image).status_code == 200


def test_mc_samples_need_dropout_count_in_the_budget_and_return_the_uncertainty(
    server, image, register_seeded, tmp_path
):
    """Last in this module: it moves champion to a Bayesian SegNet-Basic (v3, dropout 0.5)."""
    uri, url = server
    refused = post(url, image, fmt="png&mc_samples=4")
    assert refused.status_code == 400 and "has no dropout" in refused.text
    register_seeded(uri, NAME, 3, 0.1, tmp_path, dropout=0.5)
    runs.client(uri).set_registered_model_alias(NAME, "champion", "3")
    assert requests.post(f"{url}/reload", timeout=120).json()["version"] == "3"
    heat = post(url, image, fmt="png&mc_samples=4&uncertainty=1")
    assert heat.status_code == 200 and heat.headers["x-mc-samples"] == "4"
    grey = png_labels(heat)
    assert grey.shape == (360, 480) and grey.dtype == np.uint8 and len(np.unique(grey)) > 10
    body = post(url, image, fmt="json&mc_samples=4&uncertainty=1").json()
    assert body["mc_samples"] == 4 and sum(body["counts"].values()) == 360 * 480
    mean = body["uncertainty"]["mean"]
    again = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["uncertainty"]["png"]))))
    assert again.shape == (360, 480) and 0 < mean < 1 and abs(again.mean() / 255 - mean) < 0.1
    big = _png((3000, 2000), "1")  # 6 M pixels: 48 M with 8 samples, over the budget of 30 M
    for query, data, status, reason in [
        ("mc_samples=65", image, 400, "mc_samples 65: expected 1 to 64"),
        ("mc_samples=many", image, 400, "expected a whole number"),
        ("mc_samples=8", big, 413, "3000x2000 pixels x 8 samples"),
    ]:
        r = post(url, data, fmt=f"png&{query}")
        assert r.status_code == status and reason in r.text and r.text.count("\n") == 1, r.text
    assert post(url, big).status_code == 200  # one pass of it fits


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"), reason="no Chromium here (CI installs it)")
def test_the_page_shows_the_overlay_its_legend_and_the_shares_in_a_real_browser(server, camvid_dir, tmp_path):
    """GET / in headless Chromium (Debian's package, driven by Playwright): a CamVid test image chosen in the
    page is drawn with its labels over it, each class's share beside its colour, the shares those of the
    server's labels; the page asks for nothing outside the server. A screenshot is kept in tmp_path."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI=true but no chromium on PATH: .ci/run installs Debian's chromium"
    _, url = server
    path = sorted((camvid_dir / "test").iterdir())[0]
    expected = post(url, path.read_bytes(), fmt="json").json()["counts"]
    asked = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: asked.append(r.url))
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/")
            assert NAME in page.text_content("#model")
            page.set_input_files("#file", str(path))
            page.wait_for_selector("#overlay[data-done='1']", timeout=60_000)
            size = page.eval_on_selector("#overlay", "c => [c.width, c.height]")
            rows = page.eval_on_selector_all(
                "#legend tr", "rows => rows.map(r => [r.children[1].textContent, +r.dataset.pixels])"
            )
            changed = page.eval_on_selector("#overlay", OVERLAY_DIFFERS)
            assert page.is_hidden("#uncertainty-figure")  # this model has no dropout
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert size == [480, 360]
    assert dict(rows) == expected  # each class's pixels as the server labelled them, by name
    assert changed > 0.5, changed  # the labels' colours are mixed into most of the picture
    assert all(u.startswith(url) or u.startswith("blob:") for u in asked), asked


# The share of the overlay's pixels that differ from the photo drawn alone (in the page, as it shows them).
OVERLAY_DIFFERS = """async (canvas) => {
  const input = document.getElementById("file").files[0];
  const bitmap = await createImageBitmap(input, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const plain = new OffscreenCanvas(canvas.width, canvas.height).getContext("2d");
  plain.drawImage(bitmap, 0, 0);
  const a = plain.getImageData(0, 0, canvas.width, canvas.height).data;
  const b = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let differ = 0;
  for (let i = 0; i < a.length; i += 4) {
    differ += a[i] !== b[i] || a[i + 1] !== b[i + 1] || a[i + 2] !== b[i + 2];
  }
  return differ / (a.length / 4);
}"""
