import os
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import RAY_TEST_ENV, ROOT, free_port, segnet


@pytest.fixture(scope="session")
def camvid_dir() -> Path:
    """Real CamVid, from CAMVID_DIR (set by .ci/run and the Makefile)."""
    path = Path(os.environ.get("CAMVID_DIR", "../shared/camvid")).resolve()
    if not (path / "trainannot").is_dir():
        pytest.fail(f"CAMVID_DIR={path} does not hold CamVid (SegNet layout); set CAMVID_DIR")
    return path


@pytest.fixture(scope="session")
def segnet_cli(tmp_path_factory):
    """`segnet_cli(*ARGS, cwd=, env=, worker_env=, timeout=)`: helpers.segnet (`segnet ARGS` in a new
    process, as a user runs it), with the library log files in a folder of the session, not the user's
    ~/.cache/segnet/logs."""
    logs = {"SEGNET_LOG_DIR": str(tmp_path_factory.mktemp("segnet-logs"))}

    def run(*args, env=None, **kw) -> subprocess.CompletedProcess:
        return segnet(*args, env={**logs, **(env or {})}, **kw)

    return run


@contextmanager
def _environment(**values):
    """These variables set in this process's environment for the block, then put back as they were."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    try:
        with _environment(**exports):
            yield {"bucket": f"s3://{exports['BUCKET']}", "env": exports, "state": state}
    finally:
        subprocess.run([script, "stop"], env=env, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def _start_session_ray() -> None:
    import ray

    from data_prep.shards import STARTUP_CONFIG

    # its processes inherit this environment; the commands and clusters the tests start afterwards do not
    with _environment(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0", **RAY_TEST_ENV):
        port = free_port()  # its own dashboard, and Ray Train's cleaner told where (as init_ray does)
        api = {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
        ray.init(
            address="local",
            num_cpus=2,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env=api,
            log_to_driver=False,
            _system_config=STARTUP_CONFIG,
        )


@pytest.fixture(scope="session")
def ray_local(s3):
    """One local Ray for the in-process tests of a session (started here, shut down at the end); started
    after the S3 server so that its workers reach the bucket. Started as `init_ray` starts a local Ray (its
    worker start concurrency, no preemption watcher), with the workers' output kept out of pytest's."""
    import ray

    if ray.is_initialized():  # one an in-process call of an earlier test started on its own
        ray.shutdown()
    _start_session_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True, scope="module")
def _session_ray_left_idle():
    """After each module, the session's Ray has all its CPUs free again, so that the next module can place
    its runs: a module whose runs still hold CPUs 30 s after its last test gets a warning naming what is
    alive, and the session's Ray is started anew."""
    yield
    import ray

    if not ray.is_initialized():
        return
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            from ray.util.state import list_actors

            try:
                alive = [f"{a.class_name} {a.state}" for a in list_actors(filters=[("state", "!=", "DEAD")])]
            except Exception as e:  # noqa: BLE001 - the warning says what it could
                alive = [f"(actors not listed: {e})"]
            say = f"the session's Ray has CPUs in use after the module: {alive}; restarting it"
            warnings.warn(say, stacklevel=1)
            ray.shutdown()
            _start_session_ray()
            return
        time.sleep(0.5)


# Shards of real CamVid, each built once per session (prepare through the session's Ray). They are read-only
# by convention: a test that changes shards copies them first (or prepares its own in tmp_path).


def _prepare(camvid_dir: Path, out, **kw):
    from data_prep import prepare

    prepare(camvid_dir, out, log=lambda _: None, **kw)
    return out


@pytest.fixture(scope="session")
def shards_4(camvid_dir, ray_local, tmp_path_factory) -> Path:
    """4 images per split, one shard each: for runs that only need to start, or one short epoch."""
    return _prepare(camvid_dir, tmp_path_factory.mktemp("shards-4"), shard_size=4, limit=4)


@pytest.fixture(scope="session")
def shards_12(camvid_dir, ray_local, tmp_path_factory) -> Path:
    """12 images per split in shards of 4: for searches (a trial trains one short epoch on them)."""
    return _prepare(camvid_dir, tmp_path_factory.mktemp("shards-12"), shard_size=4, limit=12)


@pytest.fixture(scope="session")
def shards_24(camvid_dir, ray_local, tmp_path_factory) -> Path:
    """24 images per split in shards of 8: for two-worker training whose loss must fall in a few epochs."""
    return _prepare(camvid_dir, tmp_path_factory.mktemp("shards-24"), shard_size=8, limit=24)


@pytest.fixture(scope="session")
def full_shards(camvid_dir, ray_local, tmp_path_factory) -> Path:
    """All of CamVid (367/101/233 images) in shards of 64."""
    return _prepare(camvid_dir, tmp_path_factory.mktemp("shards-full"), shard_size=64)


@pytest.fixture(scope="session")
def bucket_shards(s3, ray_local, camvid_dir) -> str:
    """8 images per split in shards of 4, in the loopback bucket (nothing else under this prefix)."""
    return _prepare(camvid_dir, f"{s3['bucket']}/session/shards", shard_size=4, limit=8)


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


@pytest.fixture(scope="session")
def flaky_proxy():
    """The class FlakyProxy of tests/flaky_proxy.py: a fault-injecting proxy for the loopback S3 server."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flaky_proxy", ROOT / "tests" / "flaky_proxy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FlakyProxy
