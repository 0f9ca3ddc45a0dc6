"""No cloud or Docker engine is reachable here: validate what can be validated of each file."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


def pins() -> dict:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            out[name.strip()] = version.strip()
    return out


def test_constraints_pin_torch_and_the_frameworks():
    assert {"torch", "ray", "mlflow", "albumentations", "pyarrow"} <= set(pins())
    assert pins()["torch"] == "2.13.0"


def test_dockerfile_uses_the_projects_pins():
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", text, re.M)
    assert base and base.group(1).startswith(pins()["ray"] + "-")
    assert "COPY --chown=ray:users constraints.txt" in text
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert f"torch=={pins()['torch']}" in text


def test_cluster_launcher_config_has_head_gpu_workers_and_loopback_dashboard():
    cfg = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "head_start_ray_commands",
    ):
        assert key in cfg, key
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU instances
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])


def test_kuberay_manifests_are_valid_and_match_the_ray_pin():
    cluster = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    assert cluster["spec"]["rayVersion"] == job["spec"]["rayClusterSpec"]["rayVersion"] == pins()["ray"]
    assert "segnet tune" in job["spec"]["entrypoint"]
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert gpu["nvidia.com/gpu"] == "1"
        assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].startswith(
            "segnet-platform"
        )


def test_servers_bind_loopback_by_default():
    local = (INFRA / "local-cluster.sh").read_text()
    assert "--dashboard-host=127.0.0.1" in local and "--host 127.0.0.1" in local
    assert "HOST=${HOST:-127.0.0.1}" in (INFRA / "mlflow-server.sh").read_text()


def test_cluster_files_share_a_bucket_not_a_volume():
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "cluster.yaml"):
        text = (INFRA / name).read_text()
        assert "s3://" in text and "persistentVolumeClaim" not in text, name
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):  # credentials from a Secret, as env vars
        assert "secretRef: {name: segnet-s3}" in (INFRA / name).read_text()


def test_mlflow_runs_with_basic_auth_and_credentials_never_on_a_command_line():
    script = (INFRA / "mlflow-server.sh").read_text()
    assert "--app-name basic-auth" in script
    assert "mlflow[auth]" in (ROOT / "pyproject.toml").read_text() and "Flask-WTF" in pins()
    server = [d for d in yaml.safe_load_all((INFRA / "kuberay" / "mlflow.yaml").read_text()) if d]
    deployment = next(d for d in server if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["infra/mlflow-server.sh"] and "args" not in container
    assert {"secretRef": {"name": "segnet-mlflow-admin"}} in container["envFrom"]
    assert next(d for d in server if d["kind"] == "Service")["spec"]["type"] == "ClusterIP"
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/mlflow.yaml"):
        text = (INFRA / name).read_text()
        if name != "kuberay/mlflow.yaml":  # clients: a user, from a Secret
            assert "secretRef: {name: segnet-mlflow-client}" in text, name
        literal = [e["name"] for d in yaml.safe_load_all(text) for e in _env_entries(d) if "value" in e]
        assert not [n for n in literal if "PASSWORD" in n or "SECRET" in n or "TOKEN" in n], (name, literal)


def _env_entries(node):
    """Every `env` entry of every container in a parsed manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from _env_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_entries(item)


def test_ray_token_authentication_is_on_everywhere():
    cluster = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    assert cluster["spec"]["authOptions"] == job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    launcher = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    assert "RAY_AUTH_MODE=token" in (INFRA / "local-cluster.sh").read_text()
