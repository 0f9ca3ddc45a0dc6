"""Storage faults: a damaged checkpoint (on disk or in the bucket) makes a resume fall back to the one before
it, with a warning; a full disk while writing shards or a checkpoint gives one line and promotes no partial
file. The faults are injected here: bytes flipped in a checkpoint, a file size limit (RLIMIT_FSIZE) on a
subprocess, a 2 MB tmpfs mounted in a private mount namespace."""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from data_prep import storage
from pipelines.core import checkpoint as ckpt_io
from segnet import SegNetError, build_model
from tests.helpers import ROOT, Code, error_line, flip_a_byte, mlflow_store

META = {"config": {"model": "segnet-basic"}, "num_classes": 11, "history": []}


def _model_and_optimizer(seed: int):
    """A model from `seed` and an optimiser after one step, so its momentum buffers depend on the seed."""
    torch.manual_seed(seed)
    model = build_model("segnet-basic", num_classes=11)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 16, 16)).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _same_state(a, b) -> bool:
    """Two state dicts (a model's or an optimiser's, nested) hold equal tensors and values."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _run_with_checkpoints(run_dir: Path, n: int = 3) -> list[str]:
    """A run folder with `n` checkpoints named as Ray names them (by time), epoch i from seed i."""
    folders = []
    for epoch in range(n):
        folder = run_dir / f"checkpoint_2026-11-26_10-00-0{epoch}.000000"
        folder.mkdir(parents=True)
        model, optimizer = _model_and_optimizer(epoch)
        ckpt_io.save(folder, model, optimizer, epoch, META)
        folders.append(str(folder))
    return folders


def _damage(folder: str, how: str, tmp_path: Path) -> None:
    if how == "flipped weights":
        flip_a_byte(storage.join(folder, "model.pt"))
    elif how == "flipped optimizer":
        flip_a_byte(storage.join(folder, "optimizer.pt"))
    elif how == "truncated weights":
        storage.write_bytes(storage.join(folder, "model.pt"), b"PK\x03\x04")
    elif how == "meta not json":
        storage.write_bytes(storage.join(folder, "meta.json"), b"{not json")
    elif how == "pickle with code":  # its sha256 recorded too, so only weights_only stands in the way
        path = Path(folder) / "model.pt"
        torch.save(Code(tmp_path / "marker"), path)
        meta = json.loads((Path(folder) / "meta.json").read_text())
        meta["weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (Path(folder) / "meta.json").write_text(json.dumps(meta))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["flipped weights", "flipped optimizer", "truncated weights", "meta not json", "pickle with code"]
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_it_with_one_warning(tmp_path, how):
    run_dir = tmp_path / "runs" / "r"
    folders = _run_with_checkpoints(run_dir)
    _damage(folders[2], how, tmp_path)
    model, optimizer = _model_and_optimizer(99)
    warnings = []
    used, meta = ckpt_io.restore_newest_good(folders[2], str(run_dir), model, optimizer, warnings.append)
    assert (used, meta["epoch"]) == (folders[1], 1)
    expected, expected_optimizer = _model_and_optimizer(1)
    assert _same_state(model.state_dict(), expected.state_dict())
    assert _same_state(optimizer.state_dict(), expected_optimizer.state_dict())  # the momentum buffers too
    assert len(warnings) == 1 and folders[2] in warnings[0] and "damaged" in warnings[0]
    assert not (tmp_path / "marker").exists()


def test_a_damaged_checkpoint_in_the_bucket_falls_back_and_a_run_with_none_good_is_refused(s3, tmp_path):
    local = _run_with_checkpoints(tmp_path / "r", 2)
    run_dir = f"{s3['bucket']}/storage-faults/runs/r"
    for folder in local:
        storage.copy_folder(folder, storage.join(run_dir, Path(folder).name))
    remote = ckpt_io.find(run_dir)
    flip_a_byte(storage.join(remote[1], "model.pt"))
    model, optimizer = _model_and_optimizer(99)
    warnings = []
    used, meta = ckpt_io.restore_newest_good(remote[1], run_dir, model, optimizer, warnings.append)
    assert (used, meta["epoch"], len(warnings)) == (remote[0], 0, 1)
    expected, expected_optimizer = _model_and_optimizer(0)
    assert _same_state(model.state_dict(), expected.state_dict())
    assert _same_state(optimizer.state_dict(), expected_optimizer.state_dict())
    flip_a_byte(storage.join(remote[0], "model.pt"))
    with pytest.raises(SegNetError, match="no checkpoint of .* verifies"):
        ckpt_io.restore_newest_good(remote[1], run_dir, model, optimizer, None)


def test_a_run_whose_only_checkpoint_is_cut_short_starts_over_unless_ray_train_committed_it(
    tmp_path, monkeypatch
):
    """A worker killed while Ray Train uploads its first checkpoint leaves a partial folder that Ray never
    committed: the restarted worker trains from epoch 1 with a warning. Had Ray committed it: refused."""
    import ray.train

    from pipelines.config import TrainConfig
    from pipelines.train import worker

    (folder,) = _run_with_checkpoints(tmp_path / "runs" / "r", 1)
    (Path(folder) / "optimizer.pt").unlink()  # not uploaded yet
    cfg = TrainConfig(data=str(tmp_path), storage_path=str(tmp_path / "runs"), name="r")
    model, optimizer = _model_and_optimizer(99)
    committed = []
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: (committed or [None])[0])
    assert worker.resume(model, optimizer, cfg, rank=0, world=1) == (0, [])
    assert _same_state(model.state_dict(), _model_and_optimizer(99)[0].state_dict())  # left fresh
    committed.append(ray.train.Checkpoint.from_directory(folder))
    with pytest.raises(SegNetError, match="no checkpoint of .* verifies"):
        worker.resume(model, optimizer, cfg, rank=0, world=1)


@pytest.mark.slow
def test_resume_of_a_run_whose_newest_checkpoint_is_damaged_retrains_from_the_one_before(
    ray_local, shards_4, tmp_path, segnet_cli
):
    """`segnet train --resume` after model.pt of the newest checkpoint was damaged on disk."""
    from pipelines.config import TrainConfig
    from pipelines.train.driver import train

    shards = shards_4
    mlflow = mlflow_store(tmp_path / "mlruns.db")
    cfg = TrainConfig(
        data=str(shards),
        epochs=2,
        workers=1,
        batch_size=2,
        image_size="64x96",
        keep_checkpoints=2,
        loader_workers=0,
        storage_path=str(tmp_path / "runs"),
        mlflow_uri=mlflow,
        name="r",
    )
    first = train(cfg)
    run_dir = first["run_dir"]
    good, bad = ckpt_io.find(run_dir)
    flip_a_byte(storage.join(bad, "model.pt"))
    r = segnet_cli("train", "--resume", run_dir, "--epochs", "3", "--json")  # in the session's Ray
    assert r.returncode == 0, r.stderr[-3000:]
    warned = [line for line in r.stderr.splitlines() if "warning: checkpoint" in line]  # from the worker
    assert len(warned) == 1 and bad in warned[0] and "damaged" in warned[0], r.stderr[-3000:]
    assert f"resuming from the checkpoint of epoch 1 with 1 workers: {good}" in r.stderr
    resumed = json.loads(r.stdout)  # with --json, stdout is the document alone
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]  # the same run, continued
    assert resumed["best_checkpoint"] != bad and ckpt_io.verifies(resumed["best_checkpoint"])


# ---------------------------------------------------------------- a full disk


def _limited(code: str, limit_bytes: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a Python whose files may not grow past `limit_bytes` (writes past it fail with EFBIG;
    SIGXFSZ ignored so that Python sees the error rather than being killed)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        preexec_fn=limit,
        timeout=120,
    )


def test_a_full_disk_while_saving_a_checkpoint_is_one_error_and_leaves_no_file(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    r = _limited(
        f"""
        import torch
        from pipelines.core import checkpoint
        from segnet import SegNetError, build_model
        model = build_model("segnet-basic", num_classes=11)  # 5.7 MB of weights
        try:
            checkpoint.save({str(folder)!r}, model, torch.optim.SGD(model.parameters(), lr=0.1), 0, {{}})
        except SegNetError as e:
            raise SystemExit(f"error: {{e}}")
        """,
        2**20,
        tmp_path,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {folder}/model.pt: no space to write it (File too large)"
    assert list(folder.iterdir()) == []  # no model.pt, no meta.json, no temporary file


def test_a_full_disk_while_writing_a_shard_is_one_error_and_leaves_no_file(small_camvid, tmp_path):
    """The Ray Data task of `prepare`, run as it is, in a process that may write no more than 1 MB."""
    out = tmp_path / "out"
    out.mkdir()
    r = _limited(
        f"""
        from data_prep.camvid import find_pairs
        from data_prep.shards import write_shard
        pairs = [vars(p) for p in find_pairs({str(small_camvid)!r})["train"]]  # 2 images: 1.4 MB
        task = {{"split": "train", "index": 0, "file": "train-00000-of-00001.arrow", "out": {str(out)!r},
                "compression": "none", "pairs": pairs}}
        print(write_shard(task)["error"])
        """,
        2**20,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"{out}/train-00000-of-00001.arrow: no space to write it (File too large)"
    assert list(out.iterdir()) == []


LISTER = """import json, os, sys
import pyarrow.ipc as ipc
out = sys.argv[1]
batches = lambda n: ipc.open_file(os.path.join(out, n)).num_record_batches if n.endswith(".arrow") else -1
print(json.dumps({n: batches(n) for n in os.listdir(out)}))
"""


def _private_tmpfs_works() -> bool:
    probe = "mount -t tmpfs -o size=1m tmpfs /mnt"
    r = (
        subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe], capture_output=True
        )
        if shutil.which("unshare")
        else None
    )
    return r is not None and r.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _private_tmpfs_works(), reason="no user namespaces: cannot mount a private tmpfs")
def test_prepare_into_a_full_disk_exits_with_one_line_and_no_manifest_or_partial_shard(
    small_camvid, tmp_path
):
    """`segnet prepare` (its own Ray) into a 2 MB tmpfs, mounted in a mount namespace of its own; six 0.7 MB
    shards do not fit. The listing is taken inside the namespace, before the tmpfs goes with it."""
    out = tmp_path / "out"
    out.mkdir()
    lister = tmp_path / "list.py"  # each file left, with its record batches (-1: not a shard)
    lister.write_text(LISTER)
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {out} && {sys.executable} -m pipelines.cli prepare --source "
        f"{small_camvid} --out {out} --shard-size 1 --workers 1; rc=$?; echo LISTING; "
        f"{sys.executable} {lister} {out}; exit $rc"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    last = error_line(r, "prepare")
    assert last.startswith(f"segnet prepare: error: {out}/") and "no space to write it" in last
    assert json.loads(r.stdout.split("LISTING\n", 1)[1]) == {}  # no manifest, shard or temporary file
