"""What the console shows: the project's own lines, and a progress bar within each epoch. Ray's and MLflow's
log lines go to their log files (Ray's session folder; MLflow's logger at WARNING and above is kept) unless
`segnet -v` asks for them; workers learn it from SEGNET_VERBOSE."""

import logging
import os
import sys
import warnings

VERBOSE = "SEGNET_VERBOSE"
QUIET_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.data", "ray.serve", "mlflow", "alembic", "urllib3")


def verbose() -> bool:
    return os.environ.get(VERBOSE) == "1"


def setup(is_verbose: bool = False) -> None:
    """On the driver: quiet libraries unless verbose; the setting travels to Ray workers by environment."""
    os.environ[VERBOSE] = "1" if is_verbose else "0"
    if is_verbose:
        return
    quiet()


def quiet() -> None:
    """Libraries' INFO and WARNING lines off the console (errors still show)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="mlflow")
    warnings.filterwarnings("ignore", category=UserWarning, module="ray")
    warnings.filterwarnings("ignore", category=FutureWarning)


def progress(total: int, desc: str, enabled: bool = True):
    """A progress bar (tqdm) with images/s and ETA on stderr; a no-op bar when disabled (other ranks)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True, mininterval=2.0)  # fmt: skip
