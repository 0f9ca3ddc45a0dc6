import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.compact import write_compact
from tests.helpers import without_ray

# Runs the check with Ray, MLflow and albumentations made unimportable, as on the GPU machines.
WITHOUT_RAY = without_ray("pipelines.bench.gpu_check", "gpu-check")


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu_writes_its_report(camvid_dir, tmp_path):
    data = tmp_path / "compact"
    write_compact(camvid_dir, data, limit=8)
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, "--tiny", "--data", str(data), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    rows = report["steps"]["rows"]
    measured = [r for r in rows if "images_per_s" in r]
    assert {r["row"] for r in measured} >= {
        "plain reference, NCHW",
        "plain reference, channels_last",
        "ours, eager",
    }
    assert all(r["images_per_s"] > 0 and r["flops_per_image"] > 0 for r in measured)
    assert report["bf"]["max_abs_difference"] < 1e-9
    assert report["input"]["device_augment_samples_per_s"] > 0
    t = report["training"]
    assert t["epochs"] >= 1 and 0 <= t["test_miou"] <= 1 and 0 <= t["test_bf"] <= 1
    md = (out / "gpu-check.md").read_text()
    assert "| ours, eager |" in md and "test G" in md
