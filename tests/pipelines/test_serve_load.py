"""`segnet serve` as a process under hostile load, and its stop on SIGTERM: near-limit images from many
clients beside a normal client, the server's memory sampled throughout; a signal with a request in flight."""

import io
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from pipelines.bench.bench import descendants
from tests.helpers import free_port, mlflow_store, wait_for_url

pytestmark = pytest.mark.slow
NAME = "load-test"
MAX_PIXELS = 3_000_000  # per image; the budget holds one such image and the normal client's beside it
IN_FLIGHT = 4_000_000
ADMIT_WAIT_S = 2
# docs/serving.md (Memory per request): a replica holds at most about 8 bytes per pixel in flight plus
# ~150 MB of fixed buffers; the proxy and the serve process add bodies and their own allocations. The code
# before this bound
# (full-size float logits: 65 bytes per pixel, no budget) grew by ~0.8 GB here.
MEMORY_BOUND = 10 * IN_FLIGHT + 300 * 2**20
SHAPES = [(1732, 1732), (3000, 1000), (1000, 2999), (2400, 1250)]  # (width, height), each near MAX_PIXELS


def serve_rss(pid: int) -> int:
    """Bytes resident in the serve process and the Ray workers hosting its deployment (replica, proxy,
    controller: their titles start with ray::Serve or ray::Proxy)."""
    total = 0
    for p in descendants(pid):
        try:
            title = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0]
            if p == pid or title.startswith((b"ray::Serve", b"ray::Proxy")):
                status = Path(f"/proc/{p}/status").read_text()
                total += int(status.split("VmRSS:")[1].split()[0]) * 1024
        except (OSError, IndexError):
            continue
    return total


def image_bytes(size: tuple[int, int], fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (128, 64, 32)).save(out, format=fmt)
    return out.getvalue()


def post(url: str, data: bytes, ctype: str = "image/png", timeout: float = 90) -> requests.Response:
    return requests.post(f"{url}/predict", data=data, headers={"Content-Type": ctype}, timeout=timeout)


def labels(r: requests.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


@pytest.fixture
def registered(register_seeded, tmp_path):
    uri = mlflow_store(tmp_path / "mlflow.db")
    register_seeded(uri, NAME, 1, 0.5, tmp_path)
    return uri


def start_server(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "SEGNET_LOG_DIR": str(log.parent)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_url(f"http://127.0.0.1:{port}/healthz", proc, 240)
    except BaseException:
        proc.kill()
        raise
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_hostile_load_keeps_memory_bounded_answers_every_request_and_serves_the_normal_client(
    registered, camvid_dir, tmp_path
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", f"models:/{NAME}/1", "--port", str(port)]
    cmd += ["--mlflow-uri", registered, "--max-pixels", str(MAX_PIXELS)]
    cmd += ["--max-pixels-in-flight", str(IN_FLIGHT), "--admit-wait-s", str(ADMIT_WAIT_S)]
    proc = start_server(cmd, port, tmp_path / "serve.log")
    try:
        normal = [p.read_bytes() for p in sorted((camvid_dir / "test").glob("*.png"))[:4]]
        before = [labels(post(url, image)) for image in normal]
        baseline = serve_rss(proc.pid)
        samples, done = [baseline], threading.Event()

        def sample():
            while not done.wait(0.2):
                samples.append(serve_rss(proc.pid))

        def hostile(client: int) -> list[tuple[int, str | None, float]]:
            out = []
            for i in range(3):
                fmt = ("PNG", "JPEG")[(client + i) % 2]
                data = image_bytes(SHAPES[(client + i) % len(SHAPES)], fmt)
                t0 = time.monotonic()
                r = post(url, data, f"image/{fmt.lower()}")
                out.append((r.status_code, r.headers.get("retry-after"), time.monotonic() - t0))
            return out

        def normal_client() -> list[int]:
            return [post(url, normal[i % len(normal)]).status_code for i in range(8)]

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.monotonic()
        try:
            with ThreadPoolExecutor(9) as pool:  # .result() raises what a client raised (a reset, a timeout)
                hostile_runs = [pool.submit(hostile, c) for c in range(8)]
                normal_run = pool.submit(normal_client)
                answers = [a for run in hostile_runs for a in run.result()]
                normal_statuses = normal_run.result()
        finally:
            done.set()
            sampler.join()
        elapsed = time.monotonic() - t0

        statuses = [status for status, _, _ in answers]
        assert len(answers) == 24 and set(statuses) <= {200, 413, 503}, statuses
        assert 200 in statuses and 503 in statuses, statuses  # the budget admitted some and refused some
        busy = [(retry, seconds) for status, retry, seconds in answers if status == 503]
        assert all(retry == str(ADMIT_WAIT_S) and seconds >= ADMIT_WAIT_S for retry, seconds in busy), busy
        assert normal_statuses == [200] * 8
        growth = max(samples) - baseline
        print(f"{len(samples)} samples, growth {growth / 2**20:.0f} MB of {MEMORY_BOUND / 2**20:.0f} MB")
        print(f"statuses {sorted(statuses)} in {elapsed:.0f} s")
        assert growth < MEMORY_BOUND, f"RSS grew by {growth / 2**20:.0f} MB"
        assert elapsed < 180
        after = [labels(post(url, image)) for image in normal]
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
    finally:
        stop_server(proc)


def test_sigterm_finishes_the_request_in_flight_refuses_new_ones_and_exits_0(
    registered, camvid_dir, tmp_path
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", f"models:/{NAME}/1", "--port", str(port)]
    proc = start_server([*cmd, "--mlflow-uri", registered], port, log)
    try:
        assert post(url, (camvid_dir / "test").iterdir().__next__().read_bytes()).status_code == 200
        big = image_bytes((4000, 3000), "PNG")  # seconds to predict: in flight when the signal comes
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(post, url, big)
            time.sleep(1.5)
            proc.send_signal(signal.SIGTERM)
            answer = in_flight.result()
            assert answer.status_code == 200 and labels(answer).shape == (3000, 4000)
        assert proc.wait(60) == 0
        with pytest.raises(requests.ConnectionError):
            post(url, big, timeout=10)
    finally:
        stop_server(proc)
    console = log.read_text()
    assert "Aborted" not in console and "Traceback" not in console, console[-3000:]
    assert "graceful_shutdown failed" not in console, console[-3000:]
    assert "finishing the requests in flight" in console
