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


def test_without_a_terminal_an_epoch_says_how_far_it_is_in_lines_and_draws_no_bar(capsys, monkeypatch):
    """Where the driver's stderr is a file (SEGNET_PROGRESS_BAR=0), a bar redrawn there would leave a line
    per redraw and a line of blanks per clearing: a plain line every `every_s` instead, none at the end."""
    monkeypatch.setenv(console.BAR, "0")
    with console.progress(8, "epoch 2/3", every_s=0) as advance:
        for _ in range(4):
            advance(2)
    out = capsys.readouterr().out
    assert tqdm_ray.RAY_TQDM_MAGIC not in out  # no bar's state sent to the driver
    lines = out.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"epoch 2/3: {n}/8 images" for n in (2, 4, 6)]
    assert all(line.endswith(" s left") and " img/s, " in line for line in lines), lines
    with console.progress(8, "epoch 3/3") as advance:  # the default: a line a minute, so none here
        advance(4)
    assert capsys.readouterr().out == ""


def test_setup_draws_bars_only_for_a_terminal(monkeypatch):
    for name in (console.BAR, console.VERBOSE, "RAY_DEDUP_LOGS"):  # what setup sets, put back afterwards
        monkeypatch.setenv(name, "")
    monkeypatch.setattr(console.sys.stderr, "isatty", lambda: False)
    console.setup(is_verbose=True)
    assert os.environ[console.BAR] == "0"
    monkeypatch.setattr(console.sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv(console.BAR, "")
    console.setup(is_verbose=True)
    assert os.environ[console.BAR] == "1"
    monkeypatch.setenv(console.BAR, "0")  # given: kept
    console.setup(is_verbose=True)
    assert os.environ[console.BAR] == "0"
