"""`segnet run`: the whole job in one command: CamVid -> shards -> search -> register -> predict."""

import json
import time
from pathlib import Path

from data_prep.download import find_camvid
from data_prep.shards import prepare
from pipelines.config import RunConfig
from pipelines.predict import predict
from pipelines.search.tune import tune_search
from pipelines.tracking import registry
from pipelines.tracking.runs import tracking_uri


def run(cfg: RunConfig) -> dict:
    """The whole job with one config (configs/small.yaml by default, configs/paper.yaml on GPUs)."""
    t0 = time.perf_counter()
    train_cfg = cfg.tune.train
    print(
        f"segnet run: {cfg.tune.num_samples} trials of at most {train_cfg.epochs} epochs of "
        f"{train_cfg.model} at {train_cfg.image_size or 'full size'}, {cfg.tune.max_concurrent} at a time"
    )
    camvid = find_camvid(cfg.source)
    prepare(camvid, train_cfg.data)
    summary = tune_search(cfg.tune)
    uri = tracking_uri(train_cfg.mlflow_uri)
    champion = f"{summary['registered']['name']}@champion"
    entry = registry.show(uri, champion)
    print("registry entry:\n" + json.dumps(entry, indent=2, default=str))
    image = sorted((camvid / "test").glob("*.png"))[0]
    written = predict(uri, f"models:/{champion}", image, cfg.output, with_overlay=True)["written"]
    overlay = Path(cfg.output) / f"{image.stem}_overlay.png"
    print(f"prediction: {written[0]} (class indices), overlay: {overlay}")
    minutes = (time.perf_counter() - t0) / 60
    print(f"segnet run finished in {minutes:.1f} minutes")
    return {"summary": summary, "registry": entry, "overlay": str(overlay), "minutes": minutes}
