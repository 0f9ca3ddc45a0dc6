"""What is checked before any worker starts, shared by `segnet train`, `segnet tune` and Table 1: the data
against the config (TrainConfig checks its own values), and room for the workers on the Ray cluster."""

import time
from pathlib import Path

from data_prep.augment import parse_size
from data_prep.shards import ShardReader, read_manifest, verify_shards
from pipelines.config import TrainConfig, worker_range
from segnet.errors import SegNetError
from segnet.models import min_input_size


def image_size(cfg: TrainConfig, manifest: dict | None = None) -> tuple[int, int]:
    """--image-size, else the size of the data's first validation image (`manifest`: cfg.data's, if read)."""
    if cfg.image_size:
        return parse_size(cfg.image_size)
    return tuple(ShardReader(cfg.data, "val", verify=False, manifest=manifest)[0]["label"].shape)


def check_config(cfg: TrainConfig, num_classes: int | None = None, manifest: dict | None = None) -> dict:
    """What depends on the data, checked before any worker starts (TrainConfig checks its own values).
    Returns the manifest of cfg.data: `manifest` if the caller has read it, else read here."""
    manifest = manifest or read_manifest(cfg.data)
    verify_shards(cfg.data, manifest, "train")
    verify_shards(cfg.data, manifest, "val")
    classes = len(manifest["classes"])
    if num_classes is not None and num_classes != classes:
        raise SegNetError(f"--num-classes {num_classes} does not match the manifest's {classes} classes")
    h, w = image_size(cfg, manifest)
    smallest = min_input_size(cfg.model)
    if h < smallest or w < smallest:
        raise SegNetError(f"image_size {h}x{w} is too small for {cfg.model}: each side must be >= {smallest}")
    if cfg.vgg16_weights and not Path(cfg.vgg16_weights).is_file():
        raise SegNetError(f"vgg16_weights {cfg.vgg16_weights} does not exist")
    return manifest


def check_resources(cfg: TrainConfig) -> None:
    """More workers than the cluster can place would wait forever: say so at once; or, with
    --placement-timeout, ask the autoscaler for them (a cluster like infra/cluster.yaml, whose GPU nodes start
    at min_workers: 0) and wait that long for nodes to join. An elastic run needs room for its MIN workers."""
    import ray
    from ray.autoscaler.sdk import request_resources

    low, high = worker_range(cfg.workers)
    need_cpu = low * cfg.cpus_per_worker
    need_gpu = low * cfg.gpus_per_worker

    def shortfall() -> str:
        have = ray.cluster_resources()
        if have.get("CPU", 0) >= need_cpu and have.get("GPU", 0) >= need_gpu:
            return ""
        return (
            f"{low} workers need {need_cpu} CPUs and {need_gpu:g} GPUs; the Ray cluster has "
            f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs"
        )

    short = shortfall()
    if not short:
        return
    if cfg.placement_timeout <= 0:
        raise SegNetError(f"{short} (on an autoscaling cluster, --placement-timeout SECONDS waits for nodes)")
    bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
    request_resources(bundles=[bundle] * high)
    print(f"waiting up to {cfg.placement_timeout:g} s for the autoscaler to add nodes: {short}", flush=True)
    deadline = time.monotonic() + cfg.placement_timeout
    while short := shortfall():
        if time.monotonic() > deadline:
            raise SegNetError(f"no room after --placement-timeout {cfg.placement_timeout:g} s: {short}")
        time.sleep(2)
    print("the cluster has room now", flush=True)
