"""The soak's figures (`segnet bench serve --duration`), against a tiny local HTTP server whose answers and
timing the test sets, so that the statistics and the open-loop schedule are checked in a few seconds."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from pipelines.bench.bench import bench_soak, memory_figures

DELAY_S = 0.3  # each answer's latency: a client waiting for answers would send at most 1 / DELAY_S per thread


@pytest.fixture
def server():
    """Answers every 4th request 503, the others 200, each after DELAY_S; records when each arrived."""
    arrivals, lock = [], threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                arrivals.append(time.perf_counter())
                n = len(arrivals)
            time.sleep(DELAY_S)
            self.send_response(503 if n % 4 == 0 else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", arrivals
    httpd.shutdown()


def test_the_soak_sends_on_schedule_and_counts_answers_and_errors(server, camvid_dir, tmp_path):
    url, arrivals = server
    image = sorted((camvid_dir / "test").glob("*.png"))[0]
    figures = bench_soak(url, duration=3, rate=10, workers=8, plot=tmp_path / "soak.png", image=image)
    warmup = 6  # one request per payload: 1 image x 3 sizes x PNG, JPEG
    assert figures["payloads"] == warmup and figures["requests"] == 30
    sent = np.array(arrivals[warmup:])
    assert len(sent) == 30  # on schedule: 29 gaps of 0.1 s; one client at a time would take 29 x 0.3 s
    assert 2.85 < sent[-1] - sent[0] < 2.9 + 1.5  # (slack for a machine at load 30)
    answered_503 = sum(1 for n in range(warmup + 1, warmup + 31) if n % 4 == 0)
    assert figures["errors"] == {"503": answered_503}
    assert DELAY_S * 1000 <= figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"] < 2000
    assert 0.5 * (30 - answered_503) / 3.3 < figures["requests_per_s"] <= (30 - answered_503) / 3.0
    assert (tmp_path / "soak.png").stat().st_size > 0


def test_memory_that_grows_is_not_flat_and_its_slope_is_its_growth():
    t = np.arange(0, 601, 1.0)
    growing = memory_figures([(s, int((100 + s / 60) * 2**20)) for s in t], warmup_s=60)
    assert growing["rss_slope_mb_per_min"] == pytest.approx(1.0, abs=1e-3)
    assert growing["rss_after_warmup_mb"] == 101.5 and growing["rss_end_mb"] == 109.5  # the windows' medians
    assert not growing["memory_flat"]  # +7.9% from the minute after the first to the last minute
    noise = np.random.default_rng(0).normal(0, 1, len(t))
    steady = memory_figures([(s, int((500 + n) * 2**20)) for s, n in zip(t, noise)], warmup_s=60)
    assert steady["memory_flat"] and abs(steady["rss_slope_mb_per_min"]) < 0.1
    spikes = [(s, int((500 + 150 * (i % 7 == 0 or s == 600)) * 2**20)) for i, s in enumerate(t)]
    assert memory_figures(spikes, warmup_s=60)["memory_flat"]  # a spike in the last sample is not growth
