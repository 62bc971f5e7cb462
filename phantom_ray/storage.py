"""URI helpers shared by every part of phantom_ray: a local path or ``s3://bucket/prefix``.

S3 goes through boto3 (and pyarrow's S3FileSystem for Arrow/Ray Data readers), configured only from
the standard AWS environment: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for S3-compatible
stores such as MinIO or moto, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, and ``AWS_DEFAULT_REGION`` / ``AWS_REGION``.

Writes are atomic: a local file is written to a hidden temp file next to it and ``os.replace``d, an
S3 object is a single PUT, so a reader never sees a half-written file. Hidden names (``.``/``_``
prefixed basenames) are skipped by :func:`list_files`.

    >>> join("s3://bucket/data", "shards", "a.parquet")
    's3://bucket/data/shards/a.parquet'
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlparse

__all__ = [
    "is_s3",
    "split_s3",
    "parent",
    "s3_key_segments",
    "join",
    "basename",
    "list_files",
    "iter_files",
    "canonical_uri",
    "read_bytes",
    "read_text",
    "write_bytes_atomic",
    "write_text_atomic",
    "exists",
    "size",
    "delete",
    "download_dir",
    "upload_dir",
    "pyarrow_fs",
    "s3_client",
    "storage_env",
]

_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (key without leading or trailing slash): the one
    bucket/key split. The key is taken literally (``?`` and ``#`` are key characters in S3)."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key.strip("/")


def s3_key_segments(uri: str) -> tuple[str, list[str]]:
    """(bucket, key segments) of an ``s3://`` URI, with the one meaning of dot segments everywhere:
    S3 keeps ``.`` and ``..`` literally (``a/../b`` is not ``b`` there), so a key holding them is
    refused (ValueError) rather than resolved, by every reader (storage, ingest, captioning). Empty
    segments (``a//b``) are kept; :func:`canonical_uri` drops them."""
    from urllib.parse import unquote

    bucket, key = split_s3(uri)
    segs = key.split("/") if key else []
    if any(s in (".", "..") or unquote(s) in (".", "..") for s in segs):
        raise ValueError(f"{uri!r} has '.' or '..' segments; S3 keys must be plain (S3 does not resolve them)")
    return bucket, segs


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI (always '/' for S3)."""
    uri = str(uri)
    if is_s3(uri):
        out = uri.rstrip("/")
        for p in parts:
            p = str(p).strip("/")
            if p:
                out = f"{out}/{p}"
        return out
    return os.path.join(uri, *[str(p) for p in parts])


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str) -> str:
    """The directory holding a file: ``s3://b/a/x.json`` -> ``s3://b/a``; a local path made absolute."""
    uri = str(uri).rstrip("/")
    return uri.rsplit("/", 1)[0] if is_s3(uri) else os.path.dirname(os.path.abspath(uri))


def storage_env() -> dict[str, str]:
    """The AWS_* variables of this process, to hand to Ray tasks/actors started elsewhere."""
    return {k: os.environ[k] for k in _ENV_KEYS if os.environ.get(k)}


def storage_runtime_env() -> dict:
    """A Ray ``runtime_env`` giving tasks and actors this process's storage settings (endpoint,
    region and, where the driver has them as variables, credentials), e.g.
    ``ds.map_batches(..., runtime_env=storage_runtime_env())``. Ray sets the variables before the
    worker runs our code, so no worker writes ``os.environ`` by hand and a pooled worker's
    environment never leaks into another job's tasks. Empty when nothing is set (a cluster whose
    nodes have an IAM role needs nothing)."""
    env = storage_env()
    return {"env_vars": env} if env else {}


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def s3_client():
    """A boto3 S3 client for the current AWS environment (cached per environment and process)."""
    import boto3

    key = (os.getpid(), *(os.environ.get(k) for k in _ENV_KEYS))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = boto3.session.Session().client("s3", endpoint_url=_endpoint(), region_name=_region())
            _clients[key] = client
    return client


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("_")


def _object_exists(client, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except client.exceptions.ClientError:
        return False


def list_files(uri: str, suffixes: Iterable[str] | str | None = None) -> list[str]:
    """All files under ``uri`` (recursively), sorted, as full URIs/paths; hidden names skipped.

    ``uri`` may also name a single file, which is returned as a one-element list.
    """
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    suffixes = tuple(suffixes) if suffixes else None
    out: list[str] = []
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        if key and _object_exists(client, bucket, key):
            return [f"s3://{bucket}/{key}"] if not suffixes or key.endswith(suffixes) else []
        prefix = f"{key}/" if key else ""
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if any(_is_hidden(p) for p in rel.split("/")):
                    continue
                if suffixes and not rel.endswith(suffixes):
                    continue
                out.append(f"s3://{bucket}/{obj['Key']}")
        return sorted(out)
    path = Path(uri)
    if path.is_file():
        return [str(path)] if not suffixes or str(path).endswith(suffixes) else []
    if not path.exists():
        return []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not _is_hidden(d)]
        for f in files:
            if _is_hidden(f) or (suffixes and not f.endswith(suffixes)):
                continue
            out.append(os.path.join(root, f))
    return sorted(out)


def canonical_uri(uri: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """The one spelling of a file, directory or ``s3://`` object/prefix, so that every spelling of
    the same thing compares equal (exactly-once captioning keys on it).

    * ``s3://b//k/x/`` -> ``s3://b/k/x`` (empty segments removed, no trailing slash); ``.`` and ``..``
      segments are refused (ValueError): S3 keeps them literally, see :func:`s3_key_segments`;
    * ``file:///p``, ``file://localhost/p``, ``file:/p`` -> the local path ``/p``;
    * a local path is made absolute against ``base`` (default: the current directory), normalised,
      and its symlinks resolved (``os.path.realpath``), so ``images``, ``./images/``, ``/abs/images``
      and a symlink to it are one key.
    Other URIs (``http://...``) are returned unchanged.
    """
    from urllib.parse import unquote

    s = str(uri).strip()
    if not s:
        raise ValueError("empty path/URI")
    if is_s3(s):
        bucket, segs = s3_key_segments(s)
        parts = [seg for seg in segs if seg]
        return f"s3://{bucket}/{'/'.join(parts)}" if parts else f"s3://{bucket}"
    if s.lower().startswith("file:"):
        parsed = urlparse(s)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{s!r}: file URIs on another host are not supported")
        s = unquote(parsed.path)
    elif "://" in s:
        return s
    p = os.path.expanduser(s)
    if not os.path.isabs(p):
        p = os.path.join(str(base) if base is not None else os.getcwd(), p)
    return os.path.realpath(p)


def iter_files(uri: str, suffixes: Iterable[str] | str | None = None, page_size: int = 1000) -> Iterator[str]:
    """Every file under ``uri`` (recursively) as canonical URIs/paths, hidden names skipped, in a
    deterministic order, without ever holding the whole listing: S3 is listed page by page
    (``page_size`` keys a request, lexicographic key order); a local tree is walked depth first with
    each directory's entries sorted by name. ``uri`` may name a single file."""
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    suffixes = tuple(suffixes) if suffixes else None
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    uri = canonical_uri(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        if key and _object_exists(client, bucket, key):
            if not suffixes or key.endswith(suffixes):
                yield f"s3://{bucket}/{key}"
            return
        prefix = f"{key}/" if key else ""
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
        for page in pages:
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if not rel or any(_is_hidden(p) for p in rel.split("/")):
                    continue
                if suffixes and not rel.endswith(suffixes):
                    continue
                yield f"s3://{bucket}/{obj['Key']}"
        return
    if os.path.isfile(uri):
        if not suffixes or uri.endswith(suffixes):
            yield uri
        return
    if not os.path.isdir(uri):
        return

    def walk(d: str) -> Iterator[str]:
        with os.scandir(d) as it:
            entries = sorted((e.name, e.is_dir(follow_symlinks=False), e.is_file()) for e in it)
        for name, is_dir, is_file in entries:
            if _is_hidden(name):
                continue
            path = os.path.join(d, name)
            if is_dir:
                yield from walk(path)
            elif is_file and (not suffixes or name.endswith(suffixes)):
                yield path

    yield from walk(uri)


def read_bytes(uri: str) -> bytes:
    """Whole file contents; raises FileNotFoundError naming the URI when it does not exist."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"no such object: {uri}") from exc
        except client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NoSuchBucket"):
                raise FileNotFoundError(f"no such object: {uri}") from exc
            raise
    with open(uri, "rb") as f:
        return f.read()


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file, no file, or the whole new file."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    directory = os.path.dirname(os.path.abspath(uri))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(uri)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, uri)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes_atomic(uri, text.encode(encoding))


def exists(uri: str) -> bool:
    """True if ``uri`` is an existing file/object, or a directory/prefix holding at least one object."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        if key and _object_exists(client, bucket, key):
            return True
        prefix = f"{key}/" if key else ""
        resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return resp.get("KeyCount", 0) > 0
    return os.path.exists(uri)


def size(uri: str) -> int:
    """Size in bytes of one file/object; FileNotFoundError naming the URI when it does not exist."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        try:
            return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except client.exceptions.ClientError as exc:
            raise FileNotFoundError(f"no such object: {uri}") from exc
    return os.path.getsize(uri)


def delete(uri: str) -> None:
    """Remove one file/object (no error if it is already gone)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
    elif os.path.exists(uri):
        os.unlink(uri)


def download_dir(uri: str, local_dir: str) -> str:
    """Copy every file under ``uri`` into ``local_dir``, keeping relative paths; returns local_dir."""
    os.makedirs(local_dir, exist_ok=True)
    if not is_s3(uri):
        shutil.copytree(uri, local_dir, dirs_exist_ok=True)
        return local_dir
    bucket, key = split_s3(uri)
    prefix = f"{key}/" if key else ""
    client = s3_client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if not rel or rel.endswith("/"):
                continue
            dest = os.path.join(local_dir, *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            client.download_file(bucket, obj["Key"], dest)
    return local_dir


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy every file under ``local_dir`` to ``uri`` (keeping relative paths)."""
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"not a directory: {local_dir}")
    if not is_s3(uri):
        shutil.copytree(local_dir, uri, dirs_exist_ok=True)
        return
    bucket, key = split_s3(uri)
    client = s3_client()
    for root, _, files in os.walk(local_dir):
        for f in files:
            src = os.path.join(root, f)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            client.upload_file(src, bucket, f"{key}/{rel}" if key else rel)


def pyarrow_fs(uri: str):
    """``(pyarrow.fs.FileSystem, path)`` for Arrow/Ray Data readers and writers.

    For S3 the path is ``bucket/key`` and the filesystem carries the endpoint, scheme, credentials
    and region of the AWS environment (``AWS_ENDPOINT_URL=http://host:port`` -> scheme http).
    """
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    bucket, key = split_s3(uri)
    kwargs: dict = {"region": _region()}
    endpoint = _endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")
