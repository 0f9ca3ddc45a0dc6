"""The console's progress bars: Ray's tqdm_ray draws them on the driver from the workers' states."""

import os
import subprocess
import uuid

from ray.experimental import tqdm_ray

from pipelines.core import console


def _bar_of(pid: int) -> dict:
    """A bar's state as a worker process `pid` of this machine sends it to the driver."""
    manager = tqdm_ray.instance()
    return {
        "__magic_token__": tqdm_ray.RAY_TQDM_MAGIC,
        "x": 6,
        "pos": 0,
        "desc": "epoch 2/3",
        "total": 366,
        "unit": "img",
        "ip": manager.ip,
        "pid": pid,
        "uuid": uuid.uuid4().hex,
        "closed": False,
    }


def test_the_bar_of_a_process_killed_mid_epoch_is_closed_and_a_running_ones_stays():
    """A trial that Tune stops mid-epoch never closes its bar; the search's driver closes it for it."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    manager = tqdm_ray.instance()
    manager.process_state_update(_bar_of(ended.pid))
    manager.process_state_update(_bar_of(os.getppid()))  # a process that is still running
    assert manager.bar_groups[(manager.ip, ended.pid)].bars_by_uuid
    console.close_orphan_bars()
    assert not manager.bar_groups[(manager.ip, ended.pid)].bars_by_uuid
    assert len(manager.bar_groups[(manager.ip, os.getppid())].bars_by_uuid) == 1
