"""`segnet serve` on a real Ray Serve over real HTTP: predictions, reports, bad requests, an alias move."""

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import requests
import torch
from PIL import Image

from pipelines import registry, tracking
from pipelines.serve import MAX_BODY

pytestmark = pytest.mark.slow
NAME = "serve-test"


@pytest.fixture(scope="module")
def server(ray_local, register_seeded, free_port, tmp_path_factory):
    from ray import serve

    from pipelines.serve import start

    tmp = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{tmp}/mlflow.db"
    register_seeded(uri, NAME, 1, 0.5, tmp)  # champion
    register_seeded(uri, NAME, 2, 0.4, tmp)  # not better: champion stays on v1
    url = start(uri, f"{NAME}@champion", port=free_port(), max_batch_size=4)
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
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            r = post(url, image)
            results.append((r.status_code, r.headers.get("x-model-version"), r.content))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    tracking.client(uri).set_registered_model_alias(NAME, "champion", "2")
    reloaded = requests.post(f"{url}/reload", timeout=120).json()
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    assert reloaded["version"] == "2"
    assert [status for status, _, _ in results] == [200] * len(results)
    assert {version for _, version, _ in results} == {"1", "2"}
    after = post(url, image)
    assert after.headers["x-model-version"] == "2"
    assert np.array_equal(png_labels(after), v2)


def test_bench_serve_reports_throughput_latency_and_errors_with_a_plot(server, camvid_dir, tmp_path):
    from pipelines.bench import bench_serve

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
