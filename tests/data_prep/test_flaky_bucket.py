"""The bucket when it throttles, fails, drops connections and answers late: tests/flaky_proxy.py in front of
the loopback S3 server. Every read and write goes through pyarrow's S3 filesystem with AWS's standard retries
(storage.RetryingS3FileSystem); the test checks against the store itself, not through the proxy."""

import hashlib
import os
import time

import pytest

from data_prep import read_manifest, storage

pytestmark = pytest.mark.slow
SHARES = {"slowdown": 0.05, "internal": 0.05, "reset-before": 0.05, "reset-after": 0.05, "late": 0.05}


@pytest.fixture
def flaky(s3, flaky_proxy, monkeypatch):
    """The proxy, and this process's S3 clients pointed at it (Ray workers started earlier are not)."""
    proxy = flaky_proxy(s3["env"]["AWS_ENDPOINT_URL"], SHARES, seed=7, delay=1.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.close()


def _direct(location: str) -> bytes:
    """An object read from the store itself, not through the proxy."""
    fs, path = storage.resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def test_writes_reads_copies_and_deletes_through_a_flaky_bucket_lose_and_duplicate_nothing(
    flaky, s3, tmp_path
):
    prefix = f"{s3['bucket']}/flaky/objects"
    local = tmp_path / "ckpt"
    local.mkdir()
    sizes = [100, 6_000_000, 2_000, 12_000_000]  # small puts and multipart uploads (pyarrow's parts: 5 MB)
    written = {}
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        storage.write_bytes(storage.join(prefix, f"object-{i}"), data)
        (local / f"file-{i}").write_bytes(data)
        written[f"object-{i}"] = hashlib.sha256(data).hexdigest()
    storage.copy_folder(local, storage.join(prefix, "copied"))
    assert [hashlib.sha256(storage.read_bytes(storage.join(prefix, n))).hexdigest() for n in written] == list(
        written.values()
    )
    storage.delete(storage.join(prefix, "object-0"))
    faults = {k: v for k, v in flaky.counts.items() if v}
    os.environ["AWS_ENDPOINT_URL"] = s3["env"]["AWS_ENDPOINT_URL"]  # from here on, the store itself
    assert storage.list_names(prefix) == sorted(
        set(written) - {"object-0"}
    )  # no duplicate, no temporary name
    assert storage.list_names(storage.join(prefix, "copied")) == [f"file-{i}" for i in range(len(sizes))]
    for i in range(1, len(sizes)):
        assert (
            hashlib.sha256(_direct(storage.join(prefix, f"object-{i}"))).hexdigest() == written[f"object-{i}"]
        )
    assert set(faults) == set(SHARES) and sum(faults.values()) >= 5, (
        faults
    )  # every kind of fault was injected


def test_a_bucket_that_stays_down_is_one_line_naming_the_uri_in_bounded_time(flaky, s3):
    flaky.down = True
    uri = f"{s3['bucket']}/flaky/shards"
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        read_manifest(uri)
    elapsed = time.monotonic() - t0
    assert (
        uri in str(e.value)
        and "unavailable (HTTP 503, SlowDown)" in str(e.value)
        and "\n" not in str(e.value)
    )
    assert elapsed < 60, elapsed  # storage.S3_ATTEMPTS tries with backoff, then the line
    assert flaky.counts["slowdown"] >= storage.S3_ATTEMPTS


def test_prepare_into_a_flaky_bucket_writes_every_shard_once(
    flaky, s3, ray_local, small_camvid, tmp_path, segnet_cli
):
    """`segnet prepare --out s3://` in the session's Ray, whose workers write the shards through the proxy."""
    out = f"{s3['bucket']}/flaky/prepared"
    proxy = {"AWS_ENDPOINT_URL": flaky.url}  # the command's and its workers' endpoint
    args = ["prepare", "--source", small_camvid, "--out", out, "--shard-size", "1"]
    r = segnet_cli(*args, env=proxy, worker_env=proxy, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    os.environ["AWS_ENDPOINT_URL"] = s3["env"]["AWS_ENDPOINT_URL"]
    manifest = read_manifest(out)
    shards = [sh for split in manifest["splits"].values() for sh in split["shards"]]
    assert storage.list_names(out) == sorted([sh["file"] for sh in shards] + ["manifest.json"])
    for sh in shards:  # each shard whole, as the manifest recorded it
        assert hashlib.sha256(_direct(storage.join(out, sh["file"]))).hexdigest() == sh["sha256"]
    assert sum(flaky.counts.values()) >= 3, flaky.counts
