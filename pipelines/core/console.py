"""What the console shows: the project's own lines, and a progress bar within each epoch. Ray's and MLflow's
log lines go to their log files (Ray's session folder; MLflow's to `library_log()`) unless `segnet -v` asks
for them; workers learn both from the environment (SEGNET_VERBOSE, SEGNET_LOG_FILE)."""

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

VERBOSE = "SEGNET_VERBOSE"
LOG_FILE = "SEGNET_LOG_FILE"  # where MLflow's lines go; set once per command, inherited by Ray workers
LOG_DIR = "SEGNET_LOG_DIR"  # the folder of those files, ~/.cache/segnet/logs unless set
BAR = "SEGNET_PROGRESS_BAR"  # "0": no bar (unless given, when the driver's stderr is no terminal)
LINE_EVERY_S = 60.0  # then a long epoch says how far it is in a line this often
RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")
QUIET_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.data", "ray.serve", "mlflow", "alembic", "urllib3")


SIGTERMED = threading.Event()  # set once sigterm_as_ctrl_c's handler ran: a search may end as if complete


def sigterm_as_ctrl_c() -> None:
    """SIGTERM (a scheduler's or `kill`'s stop) handled as Ctrl-C, for `train` and `tune`: Tune's own SIGINT
    handler stops the trials and saves the search's state; elsewhere KeyboardInterrupt, which the CLI turns
    into one line and exit 130. Checkpoints already in the run folder stay, so `--resume` continues.
    Ray Train's own SIGINT handler aborts its controller, then calls sys.exit(0) (which Ray turns into exit
    1 with no line): that exit becomes KeyboardInterrupt here. Only the main thread can set a handler: a
    Tune trial's `train` (another thread) leaves the search's."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        SIGTERMED.set()
        on_ctrl_c = signal.getsignal(signal.SIGINT)
        if not callable(on_ctrl_c):
            raise KeyboardInterrupt
        try:
            on_ctrl_c(signal.SIGINT, frame)
        except SystemExit:
            raise KeyboardInterrupt from None

    signal.signal(signal.SIGTERM, stop)


def verbose() -> bool:
    return os.environ.get(VERBOSE) == "1"


def library_log() -> Path | None:
    """The file that takes MLflow's log lines in this command, None when they go to the console (`-v`)."""
    return None if verbose() or not os.environ.get(LOG_FILE) else Path(os.environ[LOG_FILE])


def setup(is_verbose: bool = False) -> None:
    """On the driver: quiet libraries unless verbose; the setting travels to Ray workers by environment."""
    os.environ[VERBOSE] = "1" if is_verbose else "0"
    # a bar redrawn in a file is one line per redraw and a line of blanks per clearing; 0 or 1 given wins
    if os.environ.get(BAR) not in ("0", "1"):
        os.environ[BAR] = "1" if sys.stderr.isatty() else "0"
    # Ray holds back worker lines that differ only in numbers from another worker's and prints them later
    # as "[repeated 2x across cluster]": that would swallow the epoch lines of trials running side by side.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if is_verbose:
        return
    quiet()


def quiet() -> None:
    """Libraries' INFO and WARNING lines off the console (errors still show)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter is silent at verbose=0
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # a worker's print shows once, not twice
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # a process that imports MLflow but not tracking
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # each command its own file (not one a parent process left in the environment)
    folder = Path(os.environ.get(LOG_DIR) or Path.home() / ".cache" / "segnet" / "logs")
    os.environ[LOG_FILE] = str(folder / f"segnet-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))  # its file log, console errors
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="mlflow")
    warnings.filterwarnings("ignore", category=UserWarning, module="ray")
    warnings.filterwarnings("ignore", category=FutureWarning)


def quiet_worker() -> None:
    """In a Ray Train worker: Ray 2.60 logs each report at INFO through a logger named by its file path,
    which Train's own log-level filter misses."""
    if not verbose():
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool = True, every_s: float = LINE_EVERY_S):
    """A progress bar with images/s and ETA, from inside a Ray worker: Ray's tqdm_ray draws it on the
    driver's console. Where that is no terminal (SEGNET_PROGRESS_BAR=0), a line every `every_s` instead.
    Yields `advance(n)`; a no-op where disabled (ranks other than 0)."""
    if not enabled:
        yield lambda n: None
        return
    if os.environ.get(BAR) == "0":
        yield _progress_lines(total, desc, every_s)
        return
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc=desc, unit="img")
    try:
        yield bar.update
    finally:
        bar.close()


def _progress_lines(total: int, desc: str, every_s: float):
    """`advance(n)` that prints "DESC: N/TOTAL images, R img/s, S s left" once `every_s` have passed since
    the start or the last such line."""
    start = last = time.monotonic()
    done = 0

    def advance(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last < every_s or done >= total:
            return
        last, rate = now, done / max(now - start, 1e-9)
        left = (total - done) / rate
        print(f"{desc}: {done}/{total} images, {rate:.1f} img/s, {left:.0f} s left", flush=True)

    return advance


def close_orphan_bars() -> None:
    """Close the progress bars of this machine's processes that ended without closing them: a trial that
    Tune's scheduler stops is killed mid-epoch, and Ray's tqdm_ray would draw its last bar, frozen, to the
    end of the run. tqdm_ray has no call for this, so its manager's bar groups are read here (a Ray that
    changes them makes this a no-op; tests/pipelines/test_console.py notices). Bars of processes on other
    machines cannot be checked and stay."""
    from ray.experimental import tqdm_ray

    manager = tqdm_ray.instance()
    try:
        with manager.lock:
            orphans = [
                (group, bar)
                for (ip, pid), group in manager.bar_groups.items()
                if ip == manager.ip and group.bars_by_uuid and not _running(pid)
                for bar in list(group.bars_by_uuid.values())
            ]
            for group, bar in orphans:
                group.close_bar(bar.state)
            if orphans:
                manager._update_offsets()
    except AttributeError:
        return


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextlib.contextmanager
def json_only(on: bool):
    """With --json, every line printed while the command runs, its own, its libraries' and its child
    processes' (Ray's, Serve's), goes to stderr, so that stdout holds only the JSON document after it."""
    if not on:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def lines(figures: dict) -> str:
    """A person's view of a command's figures: one `name value` line each."""
    width = max(map(len, figures), default=0) + 2
    return "\n".join(f"{k:<{width}} {v:.1f}" if isinstance(v, float) else f"{k:<{width}} {v}"
                     for k, v in figures.items())  # fmt: skip
