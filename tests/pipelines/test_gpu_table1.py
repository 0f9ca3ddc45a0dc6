import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.compact import write_compact
from pipelines.bench import gpu_table1
from segnet.paper import PAPER_TABLE1
from tests.helpers import without_ray

# `make gpu-table1`'s module with Ray, MLflow and albumentations made unimportable, as on the GPU machines.
WITHOUT_RAY = without_ray("pipelines.bench.gpu_table1", "gpu-table1")


@pytest.fixture
def compact(camvid_dir, tmp_path) -> Path:
    write_compact(camvid_dir, tmp_path / "compact", limit=8)
    return tmp_path / "compact"


@pytest.mark.slow
def test_gpu_table1_dry_run_on_the_cpu_writes_each_row_and_the_report(compact, tmp_path):
    out = tmp_path / "gpu-table1"
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, "--tiny", "--data", str(compact), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {p.name: json.loads(p.read_text()) for p in (out / "rows").glob("*.json")}
    assert set(rows) == {f"{v}-median_frequency.json" for v in PAPER_TABLE1}
    for row in rows.values():
        assert row["epochs"] == 1 and 1 <= row["best_epoch"] <= row["epochs"]
        assert all(0 <= row[k] <= 100 for k in ("G", "C", "mIoU", "BF")) and row["infer_ms"] > 0
    report = list(csv.DictReader(open(out / "report" / "table1.csv")))
    for line in report:  # every figure of the report is the row's own
        row = rows[f"{line['variant']}-median_frequency.json"]
        assert float(line["mIoU"]) == pytest.approx(row["mIoU"]) and float(line["BF"]) == pytest.approx(
            row["BF"]
        )
    md = (out / "report" / "table1.md").read_text()
    assert all(f"| {p['paper_name']} |" in md for p in PAPER_TABLE1.values())
    assert md.count("reproduced here") + md.count("not tested here") == 3


def constructed_row(variant: str, balancing: str, score: float) -> dict:
    return {
        "variant": variant, "balancing": balancing, "epochs": 3, "best_epoch": 2, "budget_s": 50.0,
        "G": score, "C": score, "mIoU": score, "BF": score, "infer_ms": 5.0, "device": "NVIDIA H200",
        "test_images": 233,
    }  # fmt: skip


def test_rows_already_on_disk_are_not_trained_again_and_both_modes_join_the_report(compact, tmp_path):
    """A second call (--balancing none) after a first one: the report holds both modes and checks claim 3."""
    out = tmp_path / "gpu-table1"
    (out / "rows").mkdir(parents=True)
    for i, v in enumerate(PAPER_TABLE1):
        for m, score in (("median_frequency", 60.0 + i), ("none", 50.0 + i)):
            gpu_table1.save_row(out / "rows", constructed_row(v, m, score))
    assert gpu_table1.main(["--tiny", "--data", str(compact), "--out", str(out), "--balancing", "none"]) == 0
    assert json.loads((out / "rows" / "fcn-basic-none.json").read_text())["G"] == 54.0  # not retrained
    md = (out / "report" / "table1.md").read_text()
    assert "## median frequency balancing" in md and "## natural frequency balancing" in md
    assert "64.0 / 81.7 (-17.7)" in md  # fcn-basic's constructed G beside the paper's, and the difference
    assert "3. **Median-frequency balancing raises class average accuracy (C) and mIoU" in md
    assert "reproduced here (criterion: C and mIoU" in md  # median frequency 10 points above natural
    assert "NVIDIA H200" in md and "median frequency 50 s" in md
