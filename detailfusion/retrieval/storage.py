"""Local paths and ``s3://`` URIs behind one small interface (fsspec + s3fs for S3).

The S3 endpoint comes from an explicit option, else ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``
(a MinIO / moto / Ceph server); credentials are whatever boto3 reads from the environment. An
unreachable endpoint fails fast with one line naming the URI (short timeouts, few retries).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from detailfusion.errors import DetailFusionError

ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(DetailFusionError):
    """A file or object could not be read or written; the message names the URI."""


def is_remote(uri: str | Path) -> bool:
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def local_path(uri: str | Path) -> Path:
    return Path(str(uri).removeprefix("file://"))


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI."""
    if is_remote(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(local_path(base).joinpath(*parts))


def endpoint_url(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit
    for name in ENDPOINT_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def filesystem(uri: str | Path, endpoint: str | None = None):
    """``(fsspec filesystem, path inside it)`` for ``uri``."""
    import fsspec

    text = str(uri)
    if not is_remote(text):
        return fsspec.filesystem("file"), str(local_path(text).resolve())
    protocol, _, path = text.partition("://")
    options: dict = {}
    if protocol in ("s3", "s3a"):
        protocol = "s3"
        url = endpoint_url(endpoint)
        options = {
            "client_kwargs": {"endpoint_url": url} if url else {},
            "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}},
            "skip_instance_cache": True,
        }
    return fsspec.filesystem(protocol, **options), path


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_bytes(uri: str | Path, endpoint: str | None = None, fs=None) -> bytes:
    """The whole file/object; :class:`StorageError` naming ``uri`` when it cannot be read."""
    if not is_remote(uri):
        path = local_path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{path}: not found") from None
        except OSError as exc:
            raise StorageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        if fs is None:
            fs, path = filesystem(uri, endpoint)
        else:
            path = str(uri).partition("://")[2]
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{uri}: not found") from None
    except Exception as exc:  # fsspec backends raise their own error types
        raise StorageError(f"{uri}: cannot read: {describe(exc)}") from None


def check_reachable(uri: str, endpoint: str | None = None) -> None:
    """Raise one clear :class:`StorageError` when the bucket/endpoint of ``uri`` cannot be reached."""
    if not is_remote(uri):
        return
    fs, path = filesystem(uri, endpoint)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist (endpoint {endpoint_url(endpoint)})") from None
    except Exception as exc:
        raise StorageError(
            f"{uri}: S3 endpoint {endpoint_url(endpoint) or 'default AWS'} unreachable or refused: {describe(exc)}"
        ) from None
