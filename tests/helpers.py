"""What the tests share: a free port, `segnet` as a user runs it (a new process) or in this process, the
check of a refused command's one line, waiting for a condition or a server, a process tree, a flipped byte,
a pickle that runs code, and an empty MLflow store. Fixtures live in the conftest files; these are plain
functions."""

import contextlib
import functools
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Ray Train's controller looks at its workers every 2 s by default, so each run's start, end and worker
# failure is seen up to 2 s late; the tests' runs are seconds long, so it looks every 0.5 s in the session's
# Ray and in the commands the tests start. (Not in this process's environment: Ray Train would pass it on to
# each run's controller as a runtime environment, and idle workers could no longer take those actors.)
RAY_TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def free_port() -> int:
    """A TCP port free now on 127.0.0.1: not a fixed one, as other Ray instances and servers run here."""
    return free_port_block(1)


def free_port_block(size: int) -> int:
    """The first of `size` consecutive ports, all free now on 127.0.0.1. They lie below the kernel's
    ephemeral range (32768 and up), from which every outgoing connection and every bind to port 0 draws
    its port, and above Ray's worker ports (up to 19999): a port found free here is not taken by chance
    between this check and the server's start, as an ephemeral one can be (a GCS port taken so failed a
    CI run's cluster start)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - size)
        try:
            with contextlib.ExitStack() as held:
                for port in range(base, base + size):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {size} consecutive free ports in 20000-32000")


@functools.cache
def _empty_mlflow_store() -> Path:
    """An empty MLflow store made once in this process: the source of mlflow_store's copies."""
    import tempfile

    from mlflow.tracking import MlflowClient

    empty = Path(tempfile.mkdtemp(prefix="segnet-mlflow-store-")) / "empty.db"
    MlflowClient(f"sqlite:///{empty}").search_experiments()  # makes the tables
    return empty


def mlflow_store(path: Path) -> str:
    """`sqlite:///PATH` for an MLflow store at `path` whose tables are made: a copy of an empty store that
    MLflow made once in this process (a new store runs MLflow's whole chain of schema migrations, 3 s here).
    A store already at `path` is left as it is. A test about creating a store names a new file instead."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_mlflow_store(), path)
    return f"sqlite:///{path}"


def joined_ray(worker_env: dict | None = None) -> dict:
    """What has a command join the Ray this process started (the session's), when one is running: its
    address, and Ray Train's preemption watcher off as in that Ray. A local Ray of its own costs a command
    5 to 30 s here to start, fill with fresh workers and stop. Empty when none is running.

    `worker_env`: variables the command's Ray workers get instead of the session's (as `ray job submit
    --runtime-env` hands a driver its job's runtime environment, through the variable Ray reads for it)."""
    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        return {}
    address = sys.modules["ray"].get_runtime_context().gcs_address
    joined = {"RAY_ADDRESS": address, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    if worker_env:
        joined["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"runtime_env": {"env_vars": worker_env}})
    return joined


def _environment(env: dict | None, worker_env: dict | None) -> dict:
    """A command's environment: this one, the tests' Ray settings, the session's Ray joined unless `env`
    names RAY_ADDRESS (`""`: a local Ray of its own), then `env`."""
    env = env or {}
    ray = {} if "RAY_ADDRESS" in env else joined_ray(worker_env)
    return {**os.environ, **RAY_TEST_ENV, **ray, **env}


def segnet(*args, cwd=None, env=None, worker_env=None, timeout=600) -> subprocess.CompletedProcess:
    """`segnet ARGS` as a user runs it: a new process with its own console, joined to the session's Ray
    when one is running (`joined_ray`, its workers given `worker_env`) unless `env` names RAY_ADDRESS
    (`""`: a local Ray of its own); `env` adds to this environment."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_environment(env, worker_env),
        timeout=timeout,
    )


def start_segnet(*args, env=None, worker_env=None, **popen) -> subprocess.Popen:
    """`segnet ARGS` started in the background (stdout and stderr piped as text unless `popen` says
    otherwise), for a test that interrupts it or watches it run; its Ray as `segnet`'s."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *map(str, args)], env=_environment(env, worker_env), **popen
    )


def segnet_here(*args, cwd=None) -> subprocess.CompletedProcess:
    """`segnet ARGS` in this process, for commands that start nothing (a new Python for each would import
    torch each time); main() sets the console's variables, so the environment is put back afterwards."""
    from pipelines import cli

    out, err = io.StringIO(), io.StringIO()
    cwd_before, env_before = os.getcwd(), dict(os.environ)
    try:
        os.chdir(cwd or cwd_before)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(map(str, args)))
            except SystemExit as e:  # --help and --print-config exit
                code = e.code or 0
    finally:
        os.chdir(cwd_before)
        os.environ.clear()
        os.environ.update(env_before)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def error_line(r: subprocess.CompletedProcess, command: str | None = None, only: bool = False) -> str:
    """What a refused command must end with: exit status 2, no traceback, and a last line on stderr that
    starts `segnet COMMAND: error: ` (when `command` is given) and is its only line (when `only`).
    Returns that line, for the test to check what it names."""
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert lines and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not only or len(lines) == 1, r.stderr[-3000:]
    assert not command or lines[-1].startswith(f"segnet {command}: error: "), lines[-1]
    return lines[-1]


def wait_until(condition, seconds: float, proc: subprocess.Popen | None = None, say=lambda: "", every=0.5):
    """Ask `condition()` every `every` s until it is true; fails once `seconds` have passed, or as soon as
    `proc` (the process that should make it true) has exited. `say()` adds to the failure's message."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc is None or proc.poll() is None, f"{proc.args[:4]} exited with {proc.returncode}\n{say()}"
        assert time.monotonic() < deadline, f"waited {seconds} s\n{say()}"
        time.sleep(every)


def answers(url: str) -> bool:
    """Whether a server answers at `url` (any HTTP status but a connection refused or timed out)."""
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


def wait_for_url(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Wait until the server process `proc` answers at `url` (fails if it exits first)."""
    wait_until(lambda: answers(url), seconds, proc, say=lambda: f"{url} did not answer")


def process_tree(*pids: int) -> list[int]:
    """These processes and all their descendants (Ray renames its agents and workers, so their command
    lines no longer say whose they are: they are found through their parents)."""
    found, todo = [], list(pids)
    while todo:
        found.append(todo.pop())
        children = subprocess.run(["pgrep", "-P", str(found[-1])], capture_output=True, text=True).stdout
        todo += [int(p) for p in children.split()]
    return found


def processes_naming(pattern: str) -> list[int]:
    """The processes whose command line matches `pattern` (pgrep -f), not this one."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def kill_all(pids) -> None:
    """SIGKILL each process that is still there."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # gone with its parent
            os.kill(pid, signal.SIGKILL)


def complete_checkpoints(run_dir: Path) -> int:
    """How many of a run folder's checkpoints are whole (both files have the sha256 meta.json records): one
    that Ray Train is still uploading is not counted, so a fault injected after it has something to resume."""
    import hashlib
    import json

    count = 0
    for folder in Path(run_dir).glob("checkpoint_*"):
        try:
            meta = json.loads((folder / "meta.json").read_text())
            files = {"model.pt": meta["weights_sha256"], "optimizer.pt": meta["optimizer_sha256"]}
            count += all(hashlib.sha256((folder / f).read_bytes()).hexdigest() == h for f, h in files.items())
        except (OSError, ValueError, KeyError):
            continue
    return count


def flip_a_byte(location, at: int | None = None) -> None:
    """Damage a file in place, locally or in a bucket: one byte inverted, at `at` (default the middle)."""
    from data_prep import storage

    data = bytearray(storage.read_bytes(location))
    data[len(data) // 2 if at is None else at] ^= 0xFF
    storage.write_bytes(location, bytes(data))


class Code:
    """A pickle that runs `touch MARKER` when loaded: the marker file shows whether any loader ran it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def without_ray(module: str, prog: str) -> str:
    """`python -c` code that runs `module` as `prog` with Ray, MLflow and albumentations made unimportable,
    as on the GPU machines."""
    return f"""
import runpy, sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {{"ray", "mlflow", "albumentations"}}:
            raise ImportError(f"{{name}} is not installed on the GPU machines")
sys.meta_path.insert(0, Missing())
sys.argv = [{prog!r}] + sys.argv[1:]
runpy.run_module({module!r}, run_name="__main__")
"""
