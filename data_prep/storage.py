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
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from segnet.errors import SegNetError

CACHE = Path(tempfile.gettempdir()) / "segnet-cache"  # node-local: each node's own temp directory
CACHE_BYTES = "SEGNET_CACHE_BYTES"  # the environment variable bounding it
DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "HTTP status 403")
FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no room: a full disk, a file size limit, a quota
SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}  # pyarrow filesystem type -> URI scheme
# S3: each request tried up to S3_ATTEMPTS times (AWS's standard retry mode: throttling, 5xx, resets, with
# jittered backoff), so a store that stays down is named after about 10 s; a request that hangs is cut at
# S3_TIMEOUT_S. boto3 (MLflow's artifacts) has the same from AWS_RETRY_MODE=standard, AWS_MAX_ATTEMPTS.
S3_ATTEMPTS = 5
S3_TIMEOUT_S = 60.0


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
    elif "HTTP status 503" in text or "SlowDown" in text:
        reason = f"the store is unavailable (HTTP 503, SlowDown) after {S3_ATTEMPTS} attempts: {text[:200]}"
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
        fs, path = pafs.FileSystem.from_uri(str(location))
    except (OSError, pa.ArrowInvalid) as e:
        raise failed(str(location), e) from e
    if isinstance(fs, pafs.S3FileSystem) and not isinstance(fs, RetryingS3FileSystem):
        fs = retrying_s3(fs.__reduce__()[1][0])  # the options from_uri read (endpoint, region, query)
    return fs, path


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with the retries above. pyarrow's own pickle drops the retry strategy, so this
    one pickles as a call that builds it again: Ray's workers upload checkpoints through it."""

    def __init__(self, options: dict):
        super().__init__(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))
        self.options = options

    def __reduce__(self):
        return retrying_s3, (self.options,)


def retrying_s3(options: dict) -> RetryingS3FileSystem:
    timeouts = {k: S3_TIMEOUT_S for k in ("connect_timeout", "request_timeout") if options.get(k, -1) < 0}
    return RetryingS3FileSystem({**options, **timeouts})


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


def verified_shard(
    location: str, sha256: str, cache: Path | None = None, cache_bytes: int | None = None
) -> str:
    """A local file holding the shard at `location`, checked against the manifest's sha256 once per node.

    Local shards are read where they are (a marker in the cache remembers the check); remote ones are
    copied once into the node-local cache and memory-mapped from there. The cache key holds the source's
    size and modification time and the manifest's sha256, so a shard that changes (or a new manifest) is
    checked again, and refused if it no longer matches. `cache`: another folder than the node's (benches).
    The copies are bounded (`cache_bound`): the least recently used ones that no reader holds make room."""
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
        if not local:
            # a use, for the least-recently-used order (access time); the modification time stays the fetch's
            os.utime(done, ns=(time.time_ns(), done.stat().st_mtime_ns))
        return result
    cache.mkdir(parents=True, exist_ok=True)
    if not local:
        make_room(cache, found.size, cache_bound(cache, cache_bytes))
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


def cache_use(cache: Path) -> int:
    """Bytes of shard copies in a node cache."""
    return sum(f.stat().st_size for f in cache.glob("*.arrow") if f.exists())


def cache_bound(cache: Path, cache_bytes: int | None = None) -> int:
    """The node cache's bound in bytes: `cache_bytes`, else SEGNET_CACHE_BYTES, else half of what its disk
    has free plus what the cache already holds (so the bound does not shrink as the cache fills)."""
    if cache_bytes is None and os.environ.get(CACHE_BYTES):
        try:
            cache_bytes = int(float(os.environ[CACHE_BYTES]))
        except ValueError:
            raise SegNetError(f"{CACHE_BYTES}={os.environ[CACHE_BYTES]!r} is not a number of bytes") from None
    if cache_bytes is not None:
        return cache_bytes
    disk = os.statvfs(cache)
    return (disk.f_bavail * disk.f_frsize + cache_use(cache)) // 2


def hold_shard(path: str | Path):
    """Open a cached shard for reading, with a shared lock that keeps it from eviction until closed.
    FileNotFoundError when it was evicted (the caller fetches it again)."""
    f = open(path, "rb")
    fcntl.flock(f, fcntl.LOCK_SH)
    try:
        if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:  # evicted between open and lock
            raise FileNotFoundError(path)
    except FileNotFoundError:
        f.close()
        raise
    return f


def make_room(cache: Path, need: int, bound: int) -> list[Path]:
    """Evict cached shards, least recently used (by access time) first, until `need` more bytes fit in
    `bound`; a shard a reader holds (`hold_shard`) is never evicted, so the cache exceeds its bound rather
    than fail a reader. Returns the evicted files."""
    evicted = []
    with open(cache / ".evict.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one eviction at a time on a node
        files = []
        for f in cache.glob("*.arrow"):
            try:
                st = f.stat()
                files.append((st.st_atime_ns, st.st_size, f))
            except FileNotFoundError:
                continue
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files):
            if total + need <= bound:
                break
            try:
                with open(f, "rb") as candidate:
                    fcntl.flock(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    f.unlink()
            except (BlockingIOError, FileNotFoundError):  # held by a reader, or gone already
                continue
            total -= size
            evicted.append(f)
    return evicted
