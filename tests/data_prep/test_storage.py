"""Shards, manifests and errors through a real loopback S3 server (infra/local-s3.sh, moto's server)."""

import hashlib
import os
import socket
import subprocess
import sys
import time
import types

import pyarrow.fs as pafs
import pytest

from data_prep import iter_samples, prepare, read_manifest, storage
from data_prep.shards import ShardReader, verify_shards
from segnet import SegNetError
from tests.helpers import error_line, flip_a_byte, free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh node-local cache, as on a node that has seen no shard yet."""
    monkeypatch.setattr(storage, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def test_prepare_writes_shards_and_manifest_into_the_bucket(bucket_shards):
    names = storage.list_names(bucket_shards)
    manifest = read_manifest(bucket_shards)
    shards = {sh["file"] for split in manifest["splits"].values() for sh in split["shards"]}
    assert set(names) == shards | {"manifest.json"}  # nothing else: no temporary names left behind
    assert [s["name"] for s in iter_samples(bucket_shards, "val")]


def test_each_shard_is_hashed_once_per_node_and_manifest(bucket_shards, cache, monkeypatch):
    hashed = []  # one entry per shard hashed: verified_shard makes one sha256 of a shard's content each time

    class CountingSha256:
        def __init__(self, *data):
            self.digest = hashlib.sha256(*data)
            if not data:
                hashed.append(1)

        def update(self, block):
            self.digest.update(block)

        def hexdigest(self):
            return self.digest.hexdigest()

    monkeypatch.setattr(storage, "hashlib", types.SimpleNamespace(sha256=CountingSha256))
    first = ShardReader(bucket_shards, "train").files
    assert all(f.startswith(str(cache)) for f in first)
    assert len(hashed) == len(first) > 0  # each shard fetched and hashed, once
    again = verify_shards(bucket_shards, read_manifest(bucket_shards), "train")
    again += ShardReader(bucket_shards, "train", verify=False).files
    assert sorted(set(again)) == sorted(first)
    assert len(hashed) == len(first)  # the second and third reads hashed nothing: served from the cache


def test_a_shard_changed_in_the_bucket_is_refused(s3, small_camvid, ray_local, cache):
    uri = f"{s3['bucket']}/storage-test/tampered"
    prepare(small_camvid, uri, shard_size=2)
    assert len(list(iter_samples(uri, "val"))) == 2  # verified and cached
    shard = storage.join(uri, read_manifest(uri)["splits"]["val"]["shards"][0]["file"])
    time.sleep(1.1)  # object stores keep modification times to the second
    flip_a_byte(shard)
    with pytest.raises(SegNetError, match="does not match its checksum"):
        list(iter_samples(uri, "val"))


def _one_line_naming(r, uri: str) -> str:
    line = error_line(r, only=True)
    assert uri in line, line
    return line


def test_a_missing_bucket_is_one_line_naming_the_uri(s3, tmp_path, segnet_cli):
    uri = "s3://no-such-bucket-here/shards"
    line = _one_line_naming(segnet_cli("evaluate", "--checkpoint", f"{uri}/ckpt", "--data", uri), uri)
    assert "does not exist" in line


def test_an_unreachable_endpoint_is_one_line_naming_the_uri(s3, tmp_path, segnet_cli):
    uri = f"{s3['bucket']}/shards"
    closed = free_port()  # a port nothing listens on
    r = segnet_cli(
        "train",
        "--data",
        uri,
        "--storage-path",
        f"{s3['bucket']}/runs",
        env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}"},
    )
    assert "unreachable" in _one_line_naming(r, uri)


@pytest.fixture
def s3_with_credentials():
    """A second loopback S3 server that checks credentials (moto's IAM mode: after the first 3 requests,
    which create a user with full rights and its access key, every request must be signed by that key).
    Yields the endpoint, the bucket URI and the good key."""
    import json

    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    server = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _listens(port), 30, server)
        setup = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **setup)
        iam.create_user(UserName="trainer")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        signed = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
        boto3.client("s3", **signed, **setup).create_bucket(Bucket="locked")
        yield {"endpoint": endpoint, "bucket": "s3://locked", "key": key}
    finally:
        server.terminate()
        server.wait(timeout=30)


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def test_bad_credentials_are_one_line_naming_the_uri(s3_with_credentials, segnet_cli):
    s = s3_with_credentials
    uri = f"{s['bucket']}/shards"
    env = {"AWS_ENDPOINT_URL": s["endpoint"], "AWS_ACCESS_KEY_ID": s["key"]["AccessKeyId"]}
    command = ("evaluate", "--checkpoint", f"{uri}/ckpt", "--data", uri)
    bad = segnet_cli(*command, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert "access denied: check the credentials" in _one_line_naming(bad, uri)
    # the same command with the right secret gets past the store: the shards are simply not there
    good = segnet_cli(*command, env={**env, "AWS_SECRET_ACCESS_KEY": s["key"]["SecretAccessKey"]})
    assert good.returncode == 2 and "access denied" not in good.stderr, good.stderr[-2000:]


def test_local_paths_and_file_uris_name_the_same_files(tmp_path):
    storage.write_bytes(tmp_path / "a" / "x.json", b"{}")
    assert storage.read_bytes(f"file://{tmp_path}/a/x.json") == b"{}"
    assert storage.list_names(tmp_path / "a") == ["x.json"]  # written under a temporary name, renamed
    fs, path = storage.resolve("s3://bucket/key")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/key"


def test_the_node_cache_keeps_its_bound_and_the_shards_a_reader_holds(bucket_shards, cache, monkeypatch):
    manifest = read_manifest(bucket_shards)
    shards = [(split, sh) for split, s in manifest["splits"].items() for sh in s["shards"]]
    size = max(storage.info(storage.join(bucket_shards, sh["file"])).size for _, sh in shards)
    monkeypatch.setenv(storage.CACHE_BYTES, str(2 * size))  # room for two shards
    reader = ShardReader(bucket_shards, "train")
    assert reader[0]["name"]  # its shard is now mapped and held
    for split, sh in shards:
        if split != "train":
            storage.verified_shard(storage.join(bucket_shards, sh["file"]), sh["sha256"])
            assert storage.cache_use(cache) <= 2 * size
    assert os.path.exists(reader.files[reader.index[0][0]])  # held: never evicted
    assert len(list(cache.glob("*.arrow"))) == 2
    assert reader[len(reader) - 1]["name"]  # the other train shard was evicted: fetched again
