"""`segnet run`: the whole job in one command: CamVid -> shards -> search -> register -> predict."""

import json
import os
import time
from dataclasses import replace
from pathlib import Path

from data_prep.download import download
from data_prep.shards import prepare
from pipelines import registry
from pipelines.predict import predict
from pipelines.tracking import tracking_uri
from pipelines.tune import TuneConfig, tune_search

# `small` fits this 2-core CPU machine (measured in README); `paper` is the paper's recipe for GPUs.
PROFILES = {
    "small": dict(model="segnet-basic", image_size="90x120", num_samples=4, epochs=3, max_concurrent=2,
                  workers_per_trial=1, batch_size=6, lr_min=0.01, lr_max=0.2, loader_workers=1),
    "paper": dict(model="segnet-basic", image_size="360x480", num_samples=8, epochs=100, max_concurrent=4,
                  workers_per_trial=1, gpus_per_worker=1, batch_size=12, lr_min=0.01, lr_max=0.2,
                  grace_period=10, loader_workers=4),
}  # fmt: skip


def find_camvid(source: str | None) -> Path:
    """--source, else $CAMVID_DIR, else ./data/CamVid, else download it there."""
    for candidate in (source, os.environ.get("CAMVID_DIR"), "data/CamVid"):
        if candidate and (Path(candidate) / "trainannot").is_dir():
            return Path(candidate)
    print("CamVid not found in $CAMVID_DIR or ./data/CamVid: downloading it")
    return download("data/CamVid")


def run(profile: str = "small", source: str | None = None, out: str = "shards", storage: str = "runs",
        mlflow_uri: str | None = None, register_as: str = "segnet-camvid") -> dict:  # fmt: skip
    t0 = time.perf_counter()
    settings = PROFILES[profile]
    print(f"profile {profile}: {json.dumps(settings)}")
    if profile == "small":
        print("small profile: 90x120 pixels, 4 trials of at most 3 epochs: about 8 minutes on 2 CPU cores")
    camvid = find_camvid(source)
    prepare(camvid, out)
    cfg = replace(TuneConfig(data=out), storage_path=storage, mlflow_uri=mlflow_uri, register_as=register_as,
                  **settings)  # fmt: skip
    summary = tune_search(cfg)
    uri = tracking_uri(mlflow_uri)
    entry = registry.show(uri, f"{register_as}@champion")
    print("registry entry:\n" + json.dumps(entry, indent=2, default=str))
    image = sorted((camvid / "test").glob("*.png"))[0]
    written = predict(uri, f"models:/{register_as}@champion", image, "run-output", with_overlay=True)[
        "written"
    ]
    overlay = Path("run-output") / f"{image.stem}_overlay.png"
    print(f"prediction: {written[0]} (class indices), overlay: {overlay}")
    minutes = (time.perf_counter() - t0) / 60
    print(f"segnet run ({profile}) finished in {minutes:.1f} minutes")
    return {"summary": summary, "registry": entry, "overlay": str(overlay), "minutes": minutes}
