"""The registry under faults, against a real MLflow server: registrations that race, and a registering
driver killed half-way (SIGKILL from the test)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipelines.tracking import registry

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("registering.py")


def _registrar(uri: str, *stall: str) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), uri, *stall]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _said(proc, "ready")
    return proc


def _said(proc: subprocess.Popen, word: str) -> str:
    """The rest of the first line of the process's output that starts with `word` (MLflow prints too)."""
    for line in proc.stdout:
        if line.startswith(word):
            return line[len(word) :].strip()
    raise AssertionError(f"the registering process exited ({proc.wait()}) before saying {word!r}")


def _job(name, seed, miou, tmp, data) -> str:
    return json.dumps({"name": name, "seed": seed, "miou": miou, "tmp": str(tmp), "data": str(data)}) + "\n"


def test_two_registrations_at_the_same_moment_leave_champion_on_the_better(
    mlflow_server, camvid_dir, tmp_path
):
    """Two processes register at once, four times over, each released at the moment it decides about
    champion; each round both beat the champion, and which is better alternates. Read-compare-set lets the
    later alias write win (it fails this test); champion must end on the better model every time."""
    procs = [_registrar(mlflow_server, "sync"), _registrar(mlflow_server, "sync")]
    try:
        for r in range(4):
            mious = [0.5 + 0.1 * r, 0.55 + 0.1 * r][:: 1 if r % 2 else -1]
            for i, (proc, miou) in enumerate(zip(procs, mious)):
                proc.stdin.write(_job("race", 10 * r + i, miou, tmp_path / str(r), camvid_dir))
            for proc in procs:  # both lines out before either process starts: they register together
                proc.stdin.flush()
            for proc in procs:
                _said(proc, "waiting")
            for proc in procs:
                proc.stdin.write("go\n")
            for proc in procs:
                proc.stdin.flush()
            results = [json.loads(_said(proc, "result")) for proc in procs]
            winner = results[mious.index(max(mious))]
            shown = registry.show(mlflow_server, "race@champion")
            assert shown["version"] == winner["version"], (r, results)
            assert shown["metrics"]["test_miou"] == max(mious)
            assert [res["champion"] for res in results].count(True) >= 1
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(60)


@pytest.mark.parametrize("stall", ["tags", "alias"])
def test_a_driver_killed_while_registering_leaves_champion_on_a_complete_version(
    mlflow_server, register_seeded, camvid_dir, tmp_path, stall
):
    name = f"killed-{stall}"
    first = register_seeded(mlflow_server, name, 1, 0.5, tmp_path)
    proc = _registrar(mlflow_server, stall)
    proc.stdin.write(_job(name, 2, 0.9, tmp_path, camvid_dir))  # would be champion, if it got that far
    proc.stdin.flush()
    _said(proc, "stalled")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    versions = {str(v.version): v for v in registry._versions(mlflow_server, name)}
    assert set(versions) == {"1", "2"}  # the killed registration had created its version
    assert registry.show(mlflow_server, f"{name}@champion")["version"] == first["version"]
    image = sorted((camvid_dir / "test").iterdir())[0].read_bytes()
    labels = registry.load(mlflow_server, f"{name}@champion").predict(pd.DataFrame({"image": [image]}))
    assert labels[0].shape == (360, 480)  # the champion is a whole model: it loads and predicts
    if stall == "tags":  # half-logged: never a candidate, and not the "latest" a bare name resolves to
        assert registry.COMPLETE not in versions["2"].tags
        assert str(registry.resolve_version(mlflow_server, name).version) == "1"
        third = register_seeded(mlflow_server, name, 3, 0.7, tmp_path)
        assert registry.show(mlflow_server, f"{name}@champion")["version"] == third["version"] == "3"
    else:  # complete but killed before the alias moved: the next registration promotes the best complete
        assert versions["2"].tags[registry.COMPLETE] == "true"
        third = register_seeded(mlflow_server, name, 3, 0.7, tmp_path)
        assert not third["champion"]
        assert registry.show(mlflow_server, f"{name}@champion")["version"] == "2"


def test_an_alias_another_registration_created_at_the_same_instant_is_read_again(
    mlflow_server, register_seeded, tmp_path, monkeypatch
):
    """The server's unique key on the alias refuses the second of two first-ever alias writes (seen in a
    full run: sqlite's "UNIQUE constraint failed"). That writer reads the alias again and decides anew, so
    champion still ends on the better version, instead of the registration failing."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    register_seeded(mlflow_server, "created-at-once", 1, 0.5, tmp_path)
    register_seeded(mlflow_server, "created-at-once", 2, 0.7, tmp_path)
    c = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    c.delete_registered_model_alias("created-at-once", "champion")
    real, calls = MlflowClient.set_registered_model_alias, []

    def raced(self, name, alias, version):  # the other writer's alias lands first, on the worse version
        calls.append(version)
        if len(calls) == 1:
            real(self, name, alias, "1")
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases"
            )
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", raced)
    before, winner, _ = registry.move_champion(c, "created-at-once")
    assert winner == "2" and calls == ["2", "2"]
    assert registry.show(mlflow_server, "created-at-once@champion")["version"] == "2"
