"""CamVid to Arrow shards (Ray Data) and the augmented input path. Imports nothing from pipelines/."""

from data_prep.shards import iter_samples, manifest_id, prepare, ray_dataset, read_manifest

__all__ = ["iter_samples", "manifest_id", "prepare", "ray_dataset", "read_manifest"]
