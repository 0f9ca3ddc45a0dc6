"""`segnet bench scale`: what each cost of the data path comes to per image as the dataset grows.

For each factor F it builds a dataset of F x CamVid's 701 images in the generic layout (each CamVid image F
times: mirrored on odd variants, shifted with wrap-around on the others, so every image is new and the size
stays 360x480), prepares it in a child process, and measures prepare's seconds per image and the peak
resident memory of its process tree (Ray's workers included), shard bytes per image, the manifest's size
and verification time, training-read samples/s (ShardReader, random order) and the node cache's disk use
(a copy per shard, as a node has of a bucket). Each size is deleted before the next is built. The
figures: docs/benchmarks.md, "Scale"; the cost model built from them: docs/scaling.md.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import storage
from data_prep.datasets import CAMVID, find_pairs, load_pair
from data_prep.shards import MANIFEST, ShardReader, read_manifest, verify_shards

CAMVID_IMAGES = 701


def scaled_camvid(source: str | Path, out: Path, factor: int) -> Path:
    """out/ as a generic-layout dataset of `factor` variants of each CamVid image, with its dataset.yaml."""
    import yaml

    classes = [{"name": n, "color": list(c)} for n, c in zip(CAMVID.classes, CAMVID.colors)]
    description = {"name": f"camvid-x{factor}", "layout": "generic", "masks": "index"}
    description |= {"classes": classes, "void": CAMVID.num_classes}
    for split, split_pairs in find_pairs(CAMVID, source).items():
        for kind in ("images", "masks"):
            (out / kind / split).mkdir(parents=True, exist_ok=True)
        for pair in split_pairs:
            s = load_pair(CAMVID, pair)
            for v in range(factor):
                image, label = s["image"], s["label"]
                if v % 2:
                    image, label = image[:, ::-1], label[:, ::-1]
                shift = (v // 2) * 37  # a tile of the image wrapped around: a new picture, the same size
                image, label = np.roll(image, shift, axis=1), np.roll(label, shift, axis=1)
                name = f"{s['name']}-v{v:02d}"
                Image.fromarray(image).save(out / "images" / split / f"{name}.png", compress_level=1)
                Image.fromarray(label).save(out / "masks" / split / f"{name}.png", compress_level=1)
    (out / "dataset.yaml").write_text(yaml.safe_dump(description, sort_keys=False))
    return out


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total


PREPARE = """
import sys
from data_prep import prepare
from data_prep.datasets import read_description
source, out, workers, described = sys.argv[1:]
prepare(source, out, workers=int(workers), dataset=read_description(described), log=lambda _: None)
"""


def prepare_measured(source: Path, shards: Path, workers: int) -> dict:
    """Prepare in a child process (its own Ray); wall seconds and the peak RSS of its process tree."""
    cmd = [
        sys.executable,
        "-c",
        PREPARE,
        str(source),
        str(shards),
        str(workers),
        str(source / "dataset.yaml"),
    ]
    t0, peak = time.perf_counter(), 0
    child = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while child.poll() is None:
        peak = max(peak, tree_rss(child.pid))
        time.sleep(0.5)
    seconds = time.perf_counter() - t0
    if child.returncode:
        raise RuntimeError(f"prepare failed: {child.stderr.read()[-2000:]}")
    return {"prepare_s": seconds, "prepare_peak_rss_bytes": peak}


def read_rate(shards: Path, seconds: float = 20) -> float:
    """Training-read samples/s: ShardReader in a random order, each sample's pixels touched."""
    reader = ShardReader(shards, "train", verify=False)
    order = np.random.default_rng(0).permutation(len(reader))
    t0, n = time.perf_counter(), 0
    for i in order:
        s = reader[int(i)]
        int(s["image"][::97, ::97].sum()) + int(s["label"][::97, ::97].sum())
        n += 1
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def bench_scale(
    source: str | Path,
    out: str | Path,
    factors=(1, 10, 30),
    workers: int = 2,
    keep: bool = False,
    read_seconds: float = 20,
    log=print,
) -> list[dict]:
    """Each factor's figures (see the module docstring); appended to out/scale.json as they come."""
    import shutil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for factor in factors:
        root = out / f"x{factor}"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        data = scaled_camvid(source, root / "source", factor)
        build_s = time.perf_counter() - t0
        log(f"x{factor}: built the dataset in {build_s:.0f} s")
        shards = root / "shards"
        row = {"factor": factor, "images": factor * CAMVID_IMAGES, "build_s": build_s}
        row |= prepare_measured(data, shards, workers)
        manifest = read_manifest(shards)
        images = sum(s["num_images"] for s in manifest["splits"].values())
        files = list(shards.glob("*.arrow"))
        t0 = time.perf_counter()
        verify_shards(shards, manifest)  # hashes every shard (a fresh cache: nothing known yet)
        row["verify_s"] = time.perf_counter() - t0
        cache = root / "cache"
        t0 = time.perf_counter()
        for split in manifest["splits"].values():  # a node's copy of every shard, as from a bucket
            for sh in split["shards"]:
                storage.verified_shard(str(shards / sh["file"]), sh["sha256"], cache=cache / "markers")
                shutil.copyfile(shards / sh["file"], cache / sh["file"])
        row["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        row |= {
            "images": images,
            "prepare_s_per_image": row["prepare_s"] / images,
            "shard_bytes_per_image": sum(f.stat().st_size for f in files) / images,
            "shards": len(files),
            "manifest_bytes": (shards / MANIFEST).stat().st_size,
            "manifest_bytes_per_image": (shards / MANIFEST).stat().st_size / images,
            "verify_s_per_image": row["verify_s"] / images,
            "cache_bytes_per_image": row["cache_bytes"] / images,
            "read_samples_per_s": read_rate(shards, read_seconds),
            "load_average": os.getloadavg()[0],
        }
        results.append(row)
        log(json.dumps(row))
        (out / "scale.json").write_text(json.dumps(results, indent=2))
        if not keep:
            shutil.rmtree(root)
    return results
