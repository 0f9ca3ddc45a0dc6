"""infra/mlflow-server.sh runs MLflow with its basic-auth app: anonymous requests are refused, the pipeline
works with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, and the admin password is never taken from a
file others can read."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from pipelines.tracking import registry, runs
from segnet import SegNetError
from tests.helpers import error_line, free_port, wait_for_url

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "mlflow-server.sh"
ADMIN = ("admin", "admin-password-for-tests")


def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_AUTH_", "MLFLOW_TRACKING_"))}
    path = f"{Path(sys.executable).parent}:{env['PATH']}"  # the `mlflow` of this environment
    return {**env, "PATH": path, "TMPDIR": str(tmp_path), **extra}


@pytest.mark.parametrize("mode", [0o644, 0o640], ids=["644", "640"])
def test_an_admin_credentials_file_others_can_read_is_refused(tmp_path, mode):
    cred = tmp_path / "admin.cred"
    cred.write_text(":".join(ADMIN) + "\n")
    cred.chmod(mode)
    env = _env(tmp_path, ADMIN_CREDENTIALS=str(cred))
    r = subprocess.run([str(SCRIPT)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"mlflow-server.sh: ADMIN_CREDENTIALS={cred} has mode {mode:o}, expected 600: it holds the admin "
        "password (chmod 600 it)"
    ]


def test_no_admin_credentials_is_refused_in_one_line(tmp_path):
    r = subprocess.run([str(SCRIPT)], env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True)
    assert "no admin credentials" in error_line(r, only=True)


@pytest.mark.slow
def test_the_server_refuses_anonymous_requests_and_serves_the_pipeline_with_credentials(
    tmp_path, register_seeded, monkeypatch
):
    cred = tmp_path / "admin.cred"
    cred.write_text(":".join(ADMIN) + "\n")
    cred.chmod(0o600)
    port = free_port()
    env = _env(
        tmp_path, ADMIN_CREDENTIALS=str(cred), PORT=str(port), WORKERS="1", ARTIFACTS=str(tmp_path / "a")
    )
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(SCRIPT)], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_url(f"{uri}/health", proc)
        assert ADMIN[1] not in " ".join(Path(f"/proc/{proc.pid}/cmdline").read_text().split("\0"))
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(search, timeout=30).status_code == 401
        assert requests.get(search, auth=("admin", "wrong-password-123"), timeout=30).status_code == 401
        user = {"username": "trainer", "password": "trainer-password-1"}
        r = requests.post(f"{uri}/api/2.0/mlflow/users/create", json=user, auth=ADMIN, timeout=30)
        assert r.status_code == 200, r.text

        with pytest.raises(SegNetError, match=r"refused the request \(credentials: MLFLOW_TRACKING_USERNAME"):
            runs.check(uri)  # the pipeline's first call, without credentials: one line
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user["username"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user["password"])
        runs.check(uri)
        result = register_seeded(uri, "secured", 1, 0.5, tmp_path)
        assert result["champion"]
        assert registry.show(uri, "secured@champion")["version"] == result["version"]
        assert (registry.download_weights(uri, "secured@champion", tmp_path / "w") / "model.pt").is_file()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
