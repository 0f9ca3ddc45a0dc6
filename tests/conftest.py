import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def camvid_dir() -> Path:
    """Real CamVid, from CAMVID_DIR (set by .ci/run and the Makefile)."""
    path = Path(os.environ.get("CAMVID_DIR", "../shared/camvid")).resolve()
    if not (path / "trainannot").is_dir():
        pytest.fail(f"CAMVID_DIR={path} does not hold CamVid (SegNet layout); set CAMVID_DIR")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process tests of a session (started here, shut down at the end)."""
    import ray

    ray.init(num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


def copy_camvid_subset(src: Path, dest: Path, per_split: int = 2) -> Path:
    """Copy the first few real pairs of each split into a temporary SegNet-layout folder."""
    for split in ("train", "val", "test"):
        names = sorted(p.name for p in (src / split).iterdir())[:per_split]
        for sub in (split, f"{split}annot"):
            (dest / sub).mkdir(parents=True, exist_ok=True)
            for name in names:
                shutil.copy2(src / sub / name, dest / sub / name)
    return dest


@pytest.fixture
def small_camvid(camvid_dir, tmp_path) -> Path:
    return copy_camvid_subset(camvid_dir, tmp_path / "camvid")
