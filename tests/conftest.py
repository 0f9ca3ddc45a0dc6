import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def camvid_dir() -> Path:
    """Real CamVid, from CAMVID_DIR (set by .ci/run and the Makefile)."""
    path = Path(os.environ.get("CAMVID_DIR", "../shared/camvid")).resolve()
    if not (path / "trainannot").is_dir():
        pytest.fail(f"CAMVID_DIR={path} does not hold CamVid (SegNet layout); set CAMVID_DIR")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def segnet_cli(tmp_path_factory):
    """`segnet_cli(*ARGS, cwd=, env=, timeout=)` runs `segnet ARGS` as a user does: a new process with its
    own console (and its own local Ray unless `env` names RAY_ADDRESS); `env` adds to this environment.
    Library log files go to a folder of the session, not the user's ~/.cache/segnet/logs."""
    logs = {"SEGNET_LOG_DIR": str(tmp_path_factory.mktemp("segnet-logs"))}

    def run(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipelines.cli", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**os.environ, **logs, **(env or {})},
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def s3():
    """The loopback S3 server (infra/local-s3.sh), started once per session; its standard AWS_* variables
    are exported to this process, so Ray workers started afterwards inherit them. Stopped at the end."""
    state = tempfile.mkdtemp(prefix="segnet-s3-")
    env = {**os.environ, "S3_STATE_DIR": state, "S3_PORT": str(free_port()), "BUCKET": "segnet-test"}
    script = str(ROOT / "infra" / "local-s3.sh")
    started = subprocess.run(
        [script, "start"], env=env, check=True, capture_output=True, text=True, timeout=60
    )
    exports = dict(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
    saved = {k: os.environ.get(k) for k in exports}
    os.environ.update(exports)
    try:
        yield {"bucket": f"s3://{exports['BUCKET']}", "env": exports, "state": state}
    finally:
        subprocess.run([script, "stop"], env=env, timeout=60)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(s3):
    """One local Ray for the in-process tests of a session (started here, shut down at the end); started
    after the S3 server so that its workers reach the bucket."""
    import ray

    ray.init(num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


def copy_camvid_subset(src: Path, dest: Path, per_split: int = 2) -> Path:
    """Copy the first few real pairs of each split into a temporary SegNet-layout folder."""
    for split in ("train", "val", "test"):
        names = sorted(p.name for p in (src / split).iterdir())[:per_split]
        for sub in (split, f"{split}annot"):
            (dest / sub).mkdir(parents=True, exist_ok=True)
            for name in names:
                shutil.copy2(src / sub / name, dest / sub / name)
    return dest


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def png_declaring():
    """`png_declaring(width, height)`: a decompression bomb, a PNG of about 80 bytes whose header declares
    width x height RGB pixels (30000x30000: 2.7 GB once decoded)."""
    return _png_declaring


@pytest.fixture
def small_camvid(camvid_dir, tmp_path) -> Path:
    return copy_camvid_subset(camvid_dir, tmp_path / "camvid")


@contextmanager
def kill_a_train_worker(ready, address: str | None = None):
    """Fault injection from the test: once `ready()` holds, one live Ray Train worker of this session's Ray
    is sent SIGKILL. Yields the list of killed pids (empty if none was found before the block ended)."""
    import ray
    import ray.util.state

    address = address or ray.get_runtime_context().gcs_address
    killed, done = [], threading.Event()

    def kill_one():
        while not done.is_set() and not killed:
            time.sleep(0.2)
            if not ready():
                continue
            filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
            try:
                actors = ray.util.state.list_actors(address=address, filters=filters, detail=True, timeout=10)
            except Exception:  # noqa: BLE001 - the state API may be busy: ask again
                continue
            for actor in actors[:1]:
                os.kill(actor.pid, signal.SIGKILL)
                killed.append(actor.pid)

    thread = threading.Thread(target=kill_one, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        done.set()
        thread.join()


@pytest.fixture
def train_worker_killer():
    """`with train_worker_killer(ready) as killed:` (see kill_a_train_worker)."""
    return kill_a_train_worker
