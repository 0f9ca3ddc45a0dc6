"""`segnet submit`: run any pipeline step on a Ray cluster as a Ray Job, streaming its logs."""

import asyncio
import os
import shlex
import time
from pathlib import Path

from segnet.errors import SegNetError

PROJECT = Path(__file__).resolve().parent.parent
# What the job's working directory must not carry: environments, data, runs, local stores.
EXCLUDES = [".venv", ".git", "runs", "shards", "data", "mlartifacts", "mlruns.db", "*.egg-info",
            "__pycache__", ".pytest_cache", ".ruff_cache"]  # fmt: skip
STORAGE_OPTION = {
    "train": "--storage_path",
    "tune": "--train.storage_path",
    "run": "--tune.train.storage_path",
}
PACKAGES = ("segnet", "data_prep", "pipelines")
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "CAMVID_DIR")


def job_entrypoint(args: list[str], storage: str | None) -> str:
    """`python -m pipelines.cli ARGS`, with --storage-path added for the steps that write checkpoints."""
    if not args:
        raise SegNetError(
            "nothing to submit: give a subcommand after --, e.g. segnet submit -- tune --data ..."
        )
    args = list(args)
    option = STORAGE_OPTION.get(args[0])
    given = any(a.replace("-", "_").split("=")[0].endswith("storage_path") for a in args)
    if storage and option and not given:
        args += [option, storage]
    return "python -m pipelines.cli " + shlex.join(args)


def submit(address: str, args: list[str], storage: str | None = None, wait: bool = True, log=print) -> int:
    """Submit the step with the project as the job's working directory; return the job's exit status."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # The packages travel as py_modules (on every worker's path), not as a working_dir: Ray can delete a
    # working_dir under a driver whose trials have ended, and with it the driver's cwd.
    modules = [str(PROJECT / name) for name in PACKAGES]
    runtime_env = {"py_modules": modules, "excludes": EXCLUDES, "env_vars": env}
    try:
        client = JobSubmissionClient(address)
        job = client.submit_job(entrypoint=job_entrypoint(args, storage), runtime_env=runtime_env)
    except Exception as e:  # noqa: BLE001 - connection errors come in many types
        raise SegNetError(f"could not submit to the Ray cluster at {address}: {e}") from e
    log(f"submitted job {job} to {address}: {job_entrypoint(args, storage)}")
    if not wait:
        return 0

    async def stream() -> None:
        async for lines in client.tail_job_logs(job):
            print(lines, end="", flush=True)

    asyncio.run(stream())
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(1)
        status = client.get_job_status(job)
    log(f"job {job}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1
