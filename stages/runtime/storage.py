"""Object storage for the stages: `s3://bucket/key` through boto3 and `file:///abs/path`.

Stages exchange every artifact through these functions, so a run works the same on a laptop
(file://) and on a cluster (S3, MinIO, Ceph). The S3 client takes its endpoint, region and
credentials from the environment the Job sets (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION,
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the run's secretRef); boto3 reads them natively.
Every failure surfaces as a one-line `StorageError` naming the URI or the endpoint.
"""
from __future__ import annotations

import base64
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)
from tqdm import tqdm

log = logging.getLogger(__name__)

PVC_ROOT = Path("/mnt/pvc")  # the stage Job mounts each claim at /mnt/pvc/<claim>
# Where s3:// models are kept: the Job sets it to the mounted spec.modelCache claim, shared by every
# stage pod (and run) that mounts it; without it, the pod's own scratch.
MODEL_CACHE_ENV = "SELFALIGN_MODEL_CACHE"
COMPLETE_MARKER = ".selfalign-complete"  # written last into a cache folder: its download finished
CHUNK = 1 << 20
S3_DELETE_BATCH = 1000  # keys per DeleteObjects request, the API's limit
# Standard mode retries throttling (SlowDown, 503), 5xx and connection errors with exponential
# backoff and jitter (capped at 20 s per wait); 10 attempts ride out a MinIO/Ceph restart of a
# minute or two. Adaptive mode would add client-side rate limiting, which only pays when many
# clients of one process contend for a throttled bucket; a stage is one sequential writer.
# AWS_MAX_ATTEMPTS / AWS_RETRY_MODE still override both, as they do for any boto3 program.
DEFAULT_RETRY_MODE, DEFAULT_MAX_ATTEMPTS = "standard", 10
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "AuthorizationHeaderMalformed"}
_MISSING = {"404", "NoSuchKey", "NotFound"}
# Objects above 64 MiB move in 64 MiB parts, several at once: S3 caps a single PUT at 5 GB and an
# upload at 10,000 parts, so this reaches 640 GB (a model shard, an embedding cache) from a file.
TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024)


class StorageError(Exception):
    """A storage failure with a one-line cause: missing object, refused credentials, no endpoint."""


class MissingObjectError(StorageError):
    """The URI names nothing (no object, file, or bucket)."""


# --- addressing -------------------------------------------------------------------------------

def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"bad S3 URI (want s3://bucket/key): {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


def _file_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise StorageError(f"bad file URI (want file:///absolute/path): {uri}")
    return Path(parsed.path)


def _scheme(uri: str) -> str:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme not in ("s3", "file"):
        raise StorageError(f"unsupported storage URI (want s3:// or file://): {uri}")
    return scheme


def _readable(uri: str) -> str:
    """Inputs that are only read may also be pvc:// (a claim the Job mounts) or builtin:// (data
    packaged with selfalign); both are local files underneath."""
    scheme, _, rest = uri.partition("://")
    if scheme == "pvc":
        return (PVC_ROOT / rest).as_uri()
    if scheme == "builtin":
        from .builtin import data_path  # builtin imports this module

        return data_path(rest).as_uri()
    return uri


def join(prefix: str, *parts: str) -> str:
    """`prefix/part/...` with exactly one slash between the pieces."""
    return "/".join([prefix.rstrip("/"), *(p.strip("/") for p in parts)])


# --- the S3 client and its errors ----------------------------------------------------------------

def _client():
    settings = tuple(os.environ.get(name) for name in (
        "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS",
        "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"))
    return _client_for(settings)


@functools.lru_cache(maxsize=4)
def _client_for(settings: tuple[str | None, ...]):
    """One client per environment (tests change it between servers); boto3 clients are thread-safe."""
    endpoint, endpoint_s3, _, _, _, _, mode, attempts, request_checksum, response_checksum = settings
    custom = bool(endpoint or endpoint_s3)
    config = Config(
        retries={"mode": mode or DEFAULT_RETRY_MODE, "max_attempts": int(attempts or DEFAULT_MAX_ATTEMPTS)},
        connect_timeout=10,
        read_timeout=120,
        # MinIO and Ceph behind a service name serve buckets as paths, not as DNS subdomains.
        s3={"addressing_style": "path" if custom else "auto"},
        # boto3 >= 1.36 adds CRC32 checksums (x-amz-checksum-crc32, aws-chunked trailers) to every
        # upload by default, which older MinIO and Ceph RGW refuse: on a custom endpoint send them
        # only where the API requires one. AWS itself keeps boto3's default. The AWS_* variables
        # still decide when set (docs/storage.md).
        request_checksum_calculation=request_checksum or ("when_required" if custom else None),
        response_checksum_validation=response_checksum or ("when_required" if custom else None),
    )
    client = boto3.session.Session().client("s3", config=config)
    if custom:
        client.meta.events.register("before-sign.s3.DeleteObjects", _content_md5)
    return client


def _content_md5(request, **_) -> None:
    """DeleteObjects must carry a checksum of its body; since 1.36 botocore sends only CRC32, while
    MinIO and Ceph RGW releases that predate it ask for the Content-MD5 the API has always taken."""
    if request.body and "Content-MD5" not in request.headers:
        request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(request.body).digest()).decode()


def _endpoint() -> str:
    return _client().meta.endpoint_url


@contextmanager
def _translated(action: str, uri: str):
    """Turn botocore's exceptions into one-line StorageErrors that say what to fix."""
    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code == "NoSuchBucket":
            raise MissingObjectError(f"missing bucket: {uri}") from None
        if code in _MISSING or status == "404":
            raise MissingObjectError(f"missing object: {uri}") from None
        if code in _DENIED or status == "403":
            raise StorageError(
                f"storage credentials refused ({code or status}) for {action} {uri}: "
                "check the AWS_* keys of the run's storage secretRef") from None
        message = exc.response.get("Error", {}).get("Message", "")
        raise StorageError(f"{action} {uri} failed: {code} {message}".strip()) from None
    except (NoCredentialsError, PartialCredentialsError):
        raise StorageError(
            f"no storage credentials for {action} {uri}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (the run's storage secretRef)") from None
    except BotoConnectionError as exc:
        raise StorageError(f"storage endpoint unreachable: {_endpoint()} "
                           f"({type(exc).__name__} during {action} {uri})") from None
    except BotoCoreError as exc:
        raise StorageError(f"{action} {uri} failed: {exc}") from None


# --- whole objects -------------------------------------------------------------------------------

def exists(uri: str) -> bool:
    """Whether the object (s3) or the file or folder (file://) exists."""
    uri = _readable(uri)
    if _scheme(uri) == "file":
        return _file_path(uri).exists()
    bucket, key = _split_s3(uri)
    try:
        with _translated("head", uri):
            _client().head_object(Bucket=bucket, Key=key)
    except MissingObjectError:
        return False
    return True


def read_bytes(uri: str) -> bytes:
    uri = _readable(uri)
    if _scheme(uri) == "file":
        path = _file_path(uri)
        if not path.is_file():
            raise MissingObjectError(f"missing object: {uri}")
        return path.read_bytes()
    bucket, key = _split_s3(uri)
    with _translated("read", uri):
        return _client().get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str, data: bytes) -> None:
    """A single PUT on S3 (atomic: readers see the old object or the new one); temp + rename on disk.
    For small objects (JSON, text); a large one goes through `upload_file`."""
    if _scheme(uri) == "file":
        with _atomic_file(_file_path(uri)) as out:
            out.write(data)
        return
    bucket, key = _split_s3(uri)
    with _translated("write", uri):
        _client().put_object(Bucket=bucket, Key=key, Body=data)


def upload_file(path: str | Path, uri: str) -> None:
    """Copy the local file `path` to `uri`: a large object goes up in parts (TRANSFER), never as one
    PUT held in memory; temp + rename on disk."""
    if _scheme(uri) == "file":
        with _atomic_file(_file_path(uri)) as out, open(path, "rb") as source:
            shutil.copyfileobj(source, out)
        return
    bucket, key = _split_s3(uri)
    with _translated("upload", uri):
        _client().upload_file(str(path), bucket, key, Config=TRANSFER)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    from ..text.records import RecordError  # records imports this module

    try:
        return json.loads(read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{uri}: invalid JSON: {exc}") from None


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Write beside the target and rename over it, so a killed writer never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- JSON lines --------------------------------------------------------------------------------

def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines split on b"\\n" only, like a file opened in binary mode (botocore's iter_lines also
    splits on a bare b"\\r", which would shift the line numbers in error messages)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


@contextmanager
def _byte_lines(uri: str) -> Iterator[Iterator[bytes]]:
    uri = _readable(uri)
    if _scheme(uri) == "file":
        path = _file_path(uri)
        if not path.is_file():
            raise MissingObjectError(f"missing object: {uri}")
        with path.open("rb") as f:
            yield iter(f)
        return
    bucket, key = _split_s3(uri)
    with _translated("read", uri):
        body = _client().get_object(Bucket=bucket, Key=key)["Body"]
    with _translated("read", uri):
        yield _split_lines(body.iter_chunks(CHUNK))


def iter_jsonl(uri: str) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line, streamed; a bad line names uri:line."""
    from ..text.records import RecordError  # records imports this module

    with _byte_lines(uri) as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RecordError(f"{uri}:{number}: invalid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise RecordError(f"{uri}:{number}: expected a JSON object on each line")
            yield number, row


def write_jsonl(uri: str, rows: Iterable[dict]) -> int:
    """Stream rows to one JSONL object (a spooled temp file, then a multipart upload); return the count."""
    count = 0

    def write_all(out: IO[bytes]) -> None:
        nonlocal count
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
            count += 1

    if _scheme(uri) == "file":
        with _atomic_file(_file_path(uri)) as out:
            write_all(out)
        return count
    bucket, key = _split_s3(uri)
    with tempfile.SpooledTemporaryFile(max_size=64 * CHUNK) as spool:
        write_all(spool)
        spool.seek(0)
        with _translated("write", uri):
            _client().upload_fileobj(spool, bucket, key, Config=TRANSFER)  # multipart when large
    return count


# --- folders -----------------------------------------------------------------------------------

def list_uris(prefix: str) -> list[str]:
    """Every object below the folder `prefix`, sorted."""
    if _scheme(prefix) == "file":
        root = _file_path(prefix)
        if not root.is_dir():
            return []
        return sorted(p.as_uri() for p in root.rglob("*") if p.is_file())
    bucket = _split_s3(prefix)[0]
    return sorted(f"s3://{bucket}/{key}" for key in _s3_sizes(prefix))


def _s3_sizes(prefix: str) -> dict[str, int]:
    """key -> size of every object below the folder `prefix`."""
    bucket, key = _split_s3(prefix)
    folder = key.rstrip("/") + "/" if key else ""
    sizes = {}
    with _translated("list", prefix):
        for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            sizes.update((obj["Key"], obj["Size"]) for obj in page.get("Contents", []))
    return sizes


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy every file below `local_dir` to `uri/<relative path>`."""
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if _scheme(uri) == "file":
        shutil.copytree(local_dir, _file_path(uri), dirs_exist_ok=True)
        return
    bucket = _split_s3(uri)[0]
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True,
              desc=f"upload {uri}") as bar:
        for path in files:
            target = join(uri, path.relative_to(local_dir).as_posix())
            with _translated("upload", target):
                _client().upload_file(str(path), bucket, _split_s3(target)[1], Config=TRANSFER,
                                      Callback=bar.update)


def delete_dir(uri: str) -> None:
    """Remove every object below the folder `uri`; a folder that is not there is already gone."""
    if _scheme(uri) == "file":
        if _file_path(uri).exists():
            shutil.rmtree(_file_path(uri))
        return
    # boto3's resource API would batch this too, but it would bypass this module's one client
    # (endpoint, retries) and its error translation.
    bucket = _split_s3(uri)[0]
    keys = list(_s3_sizes(uri))
    for start in range(0, len(keys), S3_DELETE_BATCH):
        batch = [{"Key": key} for key in keys[start:start + S3_DELETE_BATCH]]
        with _translated("delete", uri):
            _client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


def download_dir(uri: str, local_dir: str | Path) -> None:
    """Copy every object below `uri` to `local_dir/<relative path>`; nothing there is an error."""
    local_dir = Path(local_dir)
    if _scheme(uri) == "file":
        source = _file_path(uri)
        if not source.is_dir():
            raise MissingObjectError(f"missing object: {uri}")
        shutil.copytree(source, local_dir, dirs_exist_ok=True)
        return
    sizes = _s3_sizes(uri)
    if not sizes:
        raise MissingObjectError(f"missing object: {uri} (no objects below it)")
    bucket, key = _split_s3(uri)
    folder = key.rstrip("/") + "/" if key else ""
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc=f"download {uri}") as bar:
        for obj_key in sorted(sizes):
            target = local_dir / obj_key[len(folder):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with _translated("download", f"s3://{bucket}/{obj_key}"):
                _client().download_file(bucket, obj_key, str(target), Config=TRANSFER,
                                        Callback=bar.update)


# --- model and corpus locations ------------------------------------------------------------------

def local_path(uri: str, scratch: str | Path) -> Path:
    """A local folder or file for a model or corpus URI, downloading it once into the cache.

    file:// is used in place; s3:// is copied to <cache>/<key of its content> (reused when its
    completion marker exists; `cache_root`); pvc://claim/path is where the Job mounts the claim;
    hf://org/name is a Hugging Face snapshot (needs egress); builtin://name ships with selfalign.
    """
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme == "file":
        path = _file_path(uri)
        if not path.exists():
            raise MissingObjectError(f"missing object: {uri}")
        return path
    if scheme == "s3":
        return _cached_s3(uri, cache_root(scratch))
    if scheme == "pvc":
        path = PVC_ROOT / uri.split("://", 1)[1].strip("/")
        if not path.exists():
            raise MissingObjectError(f"missing object: {uri} (looked in {path}; is the claim mounted there?)")
        return path
    if scheme == "hf":
        return _hf_snapshot(uri, Path(scratch))
    if scheme == "builtin":
        from . import builtin  # builtin raises this module's StorageError

        return builtin.materialize(uri.split("://", 1)[1], scratch)
    raise StorageError(f"unsupported model URI (want s3://, file://, pvc://, hf:// or builtin://): {uri}")


def cache_root(scratch: str | Path) -> Path:
    """$SELFALIGN_MODEL_CACHE (the Job's mount of spec.modelCache), else <scratch>/cache."""
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path(scratch) / "cache")


def content_key(uri: str, objects: dict[str, tuple[int, str]]) -> str:
    """The cache key of what `uri` holds now: its name and each object's key, size and ETag, so a
    model written again under the same URI is a new entry, never a stale copy."""
    digest = hashlib.sha256(uri.encode())
    for key in sorted(objects):
        size, etag = objects[key]
        digest.update(f"\n{key}\t{size}\t{etag}".encode())
    return digest.hexdigest()[:32]


def _cached_s3(uri: str, root: Path) -> Path:
    """Download once per cache, whichever of its ranks, stages or runs ask at the same time.

    The first caller takes the key's lock, downloads into a staging folder and renames it into
    place complete; the others wait on the lock, then find the folder and reuse it. A cache folder
    exists only complete, so it is never deleted while a reader may be using it. flock and rename
    hold on a shared volume too (NFSv4 and CephFS lock across clients), so pods on several nodes
    that mount one claim share one download.
    """
    objects = _s3_objects(uri)
    cache = root / content_key(uri, objects)
    if (cache / COMPLETE_MARKER).exists():
        log.info("using cached copy uri=%s path=%s", uri, cache)
        return cache / (cache / COMPLETE_MARKER).read_text()  # the object's name, or "" for a folder
    cache.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache.parent / f".{cache.name}.lock"):
        if (cache / COMPLETE_MARKER).exists():
            log.info("using the copy another process downloaded uri=%s path=%s", uri, cache)
            return cache / (cache / COMPLETE_MARKER).read_text()
        for stale in cache.parent.glob(f".{cache.name}.*.part"):  # its downloader died holding the lock
            shutil.rmtree(stale)
        shutil.rmtree(cache, ignore_errors=True)  # left by a version that downloaded in place
        staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".part"))
        try:
            name = _download_s3(uri, objects, staging)
            (staging / COMPLETE_MARKER).write_text(name)
            os.rename(staging, cache)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return cache / name


def _s3_objects(uri: str) -> dict[str, tuple[int, str]]:
    """key -> (size, ETag) of the objects below the folder `uri`, else of the object `uri` itself."""
    bucket, key = _split_s3(uri)
    folder = key.rstrip("/") + "/" if key else ""
    found = {}
    with _translated("list", uri):
        for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            found.update((obj["Key"], (obj["Size"], obj["ETag"])) for obj in page.get("Contents", []))
    if found:
        return found
    with _translated("head", uri):
        head = _client().head_object(Bucket=bucket, Key=key)
    return {key: (head["ContentLength"], head["ETag"])}


def _download_s3(uri: str, objects: dict[str, tuple[int, str]], folder: Path) -> str:
    """Copy the listed objects into `folder`; the name below it of a single object ("" for a
    folder). Fails if the objects changed meanwhile: their copy would not match its key."""
    log.info("downloading uri=%s path=%s objects=%d", uri, folder, len(objects))
    bucket, key = _split_s3(uri)
    single = list(objects) == [key]
    name = key.rsplit("/", 1)[-1] if single else ""
    prefix = len(key.rstrip("/") + "/") if key else 0
    with tqdm(total=sum(size for size, _ in objects.values()), unit="B", unit_scale=True,
              desc=f"download {uri}") as bar:
        for obj_key in sorted(objects):
            target = folder / (name or obj_key[prefix:])
            target.parent.mkdir(parents=True, exist_ok=True)
            with _translated("download", f"s3://{bucket}/{obj_key}"):
                _client().download_file(bucket, obj_key, str(target), Config=TRANSFER, Callback=bar.update)
    if _s3_objects(uri) != objects:
        raise StorageError(f"{uri} changed while it was downloaded; the stage's next attempt reads it again")
    return name


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on `lock_path`: the kernel frees it when its holder exits or is killed, so
    a rank that dies mid-download never blocks the next (stdlib; filelock would wrap the same call)."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _hf_snapshot(uri: str, scratch: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    repo_id = uri.split("://", 1)[1].strip("/")
    try:
        return Path(snapshot_download(repo_id, cache_dir=scratch / "hf"))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise StorageError(
            f"cannot download {uri}: the Hugging Face Hub is unreachable or offline mode is on "
            f"({type(exc).__name__}); copy the model to s3:// or a pvc:// instead") from None
    except HfHubHTTPError as exc:
        raise StorageError(f"cannot download {uri}: {' '.join(str(exc).split())}") from None
