"""A fault-injecting HTTP proxy for the loopback S3 server: a bucket that throttles, fails and answers late.

`FlakyProxy(target, shares, seed)` forwards each request to `target` (moto's server) unless the seeded draw
picks a fault for it; `shares` maps a fault to the share of requests that get it:
  slowdown      503 SlowDown, not forwarded (S3's throttling answer)
  internal      500 InternalError, not forwarded
  reset-before  the connection reset before the request is forwarded: the store never saw it
  reset-after   forwarded (the store applied it), then the connection reset before the answer: a retried
                write must be idempotent
  late          forwarded after `delay` seconds
`down = True` answers every request with 503 (a store that stays down). `counts` holds how many of each fault
were injected, and `requests` every request seen as (method, path, fault or "").
"""

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("slowdown", "internal", "reset-before", "reset-after", "late")
ERROR = "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{}</Code><Message>{}</Message></Error>"


class FlakyProxy:
    def __init__(self, target: str, shares: dict[str, float], seed: int = 0, delay: float = 2.0):
        assert set(shares) <= set(FAULTS) and sum(shares.values()) < 1, shares
        self.target, self.shares, self.delay = urlparse(target), shares, delay
        self.random, self.lock = random.Random(seed), threading.Lock()
        self.counts = dict.fromkeys(FAULTS, 0)
        self.requests: list[tuple[str, str, str]] = []
        self.down = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def draw(self, method: str, path: str) -> str:
        with self.lock:
            x, fault = self.random.random(), ""
            for name, share in self.shares.items():
                if x < share:
                    fault = name
                    break
                x -= share
            if self.down:
                fault = "slowdown"
            if fault:
                self.counts[fault] += 1
            self.requests.append((method, path, fault))
            return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: the test reads the counts
                pass

            def body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def reset(self) -> None:
                """Close with RST (SO_LINGER 0), as a dropped connection looks to the client."""
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                head = self.command == "HEAD"  # its Content-Length is the object's, as the store gave it
                for k, v in headers:
                    if k.lower() not in (
                        "transfer-encoding",
                        "connection",
                        *(() if head else ("content-length",)),
                    ):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def forward(self, data: bytes):
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
                headers["Content-Length"] = str(len(data))
                headers.pop("Expect", None)
                conn.request(self.command, self.path, body=data, headers=headers)
                r = conn.getresponse()
                out = r.status, r.getheaders(), r.read()
                conn.close()
                return out

            def handle_any(self) -> None:
                data = self.body()
                fault = proxy.draw(self.command, self.path)
                if fault == "slowdown":
                    return self.answer(
                        503, [], ERROR.format("SlowDown", "Please reduce your request rate.").encode()
                    )
                if fault == "internal":
                    return self.answer(
                        500, [], ERROR.format("InternalError", "We encountered an internal error.").encode()
                    )
                if fault == "reset-before":
                    return self.reset()
                if fault == "late":
                    time.sleep(proxy.delay)
                status, headers, out = self.forward(data)
                if fault == "reset-after":
                    return self.reset()
                self.answer(status, headers, out)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        return Handler


if __name__ == "__main__":  # a slow or flaky bucket by hand (docs/benchmarks.md): TARGET [FAULT=SHARE ...]
    import sys

    shares = dict((k, float(v)) for k, v in (a.split("=") for a in sys.argv[2:] if "=" in a))
    delay = float(shares.pop("delay", 2.0))
    proxy = FlakyProxy(sys.argv[1], shares, delay=delay)
    print(proxy.url, flush=True)
    try:
        threading.Event().wait()
    finally:
        print(proxy.counts, flush=True)
