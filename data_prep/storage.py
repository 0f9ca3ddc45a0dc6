"""Where data lives: a local path or any URI that pyarrow.fs resolves (s3://, gs://, hdfs://, file://).

Every read and write of shards, manifests, checkpoints and reports goes through here, so each failure of a
store (no bucket, bad credentials, no endpoint) becomes one SegNetError naming the URI. Credentials and
endpoints come from each store's standard variables (S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION). Also the node-local cache of verified shards (`verified_shard`).

It sits in data_prep (not pipelines) because shards are read and written through it, and data_prep
imports nothing from pipelines.
"""

import errno
import fcntl
import hashlib
import os
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from segnet.errors import SegNetError

CACHE = Path(tempfile.gettempdir()) / "segnet-cache"  # node-local: each node's own temp directory
DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "HTTP status 403")
FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no room: a full disk, a file size limit, a quota
SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}  # pyarrow filesystem type -> URI scheme


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def absolute(location: str | Path) -> str:
    """A URI as given; a local path made absolute (workers run in other directories)."""
    return str(location).rstrip("/") if is_uri(location) else str(Path(location).resolve())


def join(location: str | Path, *parts: str) -> str:
    return "/".join([str(location).rstrip("/"), *parts])


def uri(filesystem: pafs.FileSystem, path: str) -> str:
    """The location of a (filesystem, path) pair, as Ray's Checkpoint and Result give them."""
    scheme = SCHEMES.get(filesystem.type_name)
    return f"{scheme}://{path}" if scheme else path


def failed(location: str, e: Exception) -> SegNetError:
    """One line naming the URI and what went wrong, from a store's error."""
    text = " ".join(str(e).split())
    full = [n for n in FULL if getattr(e, "errno", None) == n or os.strerror(n) in text]
    if full:
        reason = f"no space to write it ({os.strerror(full[0])})"
    elif "NETWORK_CONNECTION" in text or "curlCode" in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "unset")
        reason = f"the endpoint is unreachable (AWS_ENDPOINT_URL={endpoint})"
    elif any(k in text for k in DENIED):
        reason = "access denied: check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    elif "NoSuchBucket" in text or "NO_SUCH_BUCKET" in text:
        reason = "the bucket does not exist"
    else:
        reason = text[:300]
    return SegNetError(f"{location}: {reason}")


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for a local path or URI."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (OSError, pa.ArrowInvalid) as e:
        raise failed(str(location), e) from e


def info(location: str | Path) -> pafs.FileInfo:
    """The file's info; a missing path in a missing bucket says the bucket is missing."""
    fs, path = resolve(location)
    try:
        found = fs.get_file_info(path)
        if found.type == pafs.FileType.NotFound and is_uri(location):
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise SegNetError(f"{location}: the bucket {bucket!r} does not exist")
        return found
    except OSError as e:
        raise failed(str(location), e) from e


def exists(location: str | Path) -> bool:
    return info(location).type != pafs.FileType.NotFound


def read_bytes(location: str | Path) -> bytes:
    if info(location).type != pafs.FileType.File:
        raise SegNetError(f"{location} does not exist")
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise failed(str(location), e) from e


def write_bytes(location: str | Path, data: bytes) -> None:
    """Written whole or not at all: a local file under a temporary name renamed into place, an object in one
    put (an object store never shows a partial object)."""
    fs, path = resolve(location)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path).with_name(f".{Path(path).name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as e:
        raise failed(str(location), e) from e


def put_file(local: str | Path, location: str | Path) -> None:
    """Move a finished local file into place (a rename on the same disk, else one upload)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, path)
        return
    try:
        pafs.copy_files(str(local), path, pafs.LocalFileSystem(), fs)
    except OSError as e:
        raise failed(str(location), e) from e
    Path(local).unlink()


def list_names(location: str | Path, folders: bool = False) -> list[str]:
    """Names of the files directly in a folder or under a prefix; with `folders`, subfolders' locations."""
    fs, path = resolve(location)
    try:
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise failed(str(location), e) from e
    if folders:
        return sorted(join(location, f.base_name) for f in found if f.type == pafs.FileType.Directory)
    return sorted(f.base_name for f in found if f.type == pafs.FileType.File)


def delete(location: str | Path) -> None:
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except OSError as e:
        raise failed(str(location), e) from e


def copy_folder(source: str | Path, dest: str | Path) -> None:
    """Copy a folder's files between any two locations (a checkpoint down, a report up)."""
    (src_fs, src), (dst_fs, dst) = resolve(source), resolve(dest)
    try:
        if isinstance(dst_fs, pafs.LocalFileSystem):
            Path(dst).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(src, dst, src_fs, dst_fs)
    except OSError as e:
        raise failed(f"{source} -> {dest}", e) from e


def verified_shard(location: str, sha256: str, cache: Path | None = None) -> str:
    """A local file holding the shard at `location`, checked against the manifest's sha256 once per node.

    Local shards are read where they are (a marker in the cache remembers the check); remote ones are
    copied once into the node-local cache and memory-mapped from there. The cache key holds the source's
    size and modification time and the manifest's sha256, so a shard that changes (or a new manifest) is
    checked again, and refused if it no longer matches. `cache`: another folder than the node's (benches)."""
    cache = cache or CACHE
    found = info(location)
    if found.type != pafs.FileType.File:
        raise SegNetError(f"shard {location} listed in the manifest is missing")
    fs, path = resolve(location)
    local = isinstance(fs, pafs.LocalFileSystem)
    key = hashlib.sha256(f"{location}|{found.size}|{found.mtime_ns}|{sha256}".encode()).hexdigest()[:32]
    done = cache / (f"{key}.ok" if local else f"{key}.arrow")
    result = path if local else str(done)
    if done.exists():
        return result
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one reader per node checks a shard; the others wait for it
        if done.exists():
            return result
        tmp = cache / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        digest = hashlib.sha256()
        try:
            with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 22):
                    digest.update(block)
                    if not local:
                        dst.write(block)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise failed(location, e) from e
        if digest.hexdigest() != sha256:
            tmp.unlink()
            raise SegNetError(f"shard {location} does not match its checksum in the manifest: refusing it")
        os.replace(tmp, done)
    return result
