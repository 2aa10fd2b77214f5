"""Artifact stores for images, heatmaps, overlays and label masks: a local directory, or S3.

    >>> store = open_artifact_store("/var/lib/lineguard/artifacts")         # local (default)
    >>> store = open_artifact_store("s3://bucket/prefix?endpoint_url=http://minio:9000")
    >>> uri = store.put("disc/2026-11-22/cam-0-000001/image.jpg", jpeg_bytes)
    >>> store.get(uri) == jpeg_bytes
    True

A write that fails (unwritable directory, full disk, S3 error) raises `ArtifactStoreError` with the
path and the reason; the recorder then stops without committing past the record.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import urllib.parse
from pathlib import Path
from typing import Protocol


class StorageError(Exception):
    """The recorder could not save a record durably; the message says what and why."""


class ArtifactStoreError(StorageError):
    """An artifact could not be written or read."""


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(value: str) -> str:
    """A path component made of letters, digits, '.', '_' and '-' only."""
    cleaned = _UNSAFE.sub("_", value).strip("._") or "_"
    return cleaned[:120]


class ArtifactStore(Protocol):
    root: str

    def put(self, key: str, data: bytes) -> str: ...

    def get(self, uri: str) -> bytes: ...

    def delete(self, uri: str) -> None: ...

    def uri_of(self, key: str) -> str: ...


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        text = "disk full"
    return f"{text} ({name})" if name else text


class LocalArtifactStore:
    """Files under a directory; each write goes to a temporary file, is fsynced, then renamed."""

    def __init__(self, root: str | Path):
        self.root = str(Path(root).resolve())

    def _path(self, key: str) -> Path:
        path = Path(self.root, *[safe_name(part) for part in key.split("/")])
        return path

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(Exception):
                tmp.unlink(missing_ok=True)
            raise ArtifactStoreError(f"cannot write artifact {path} (LINEGUARD_STORE_ARTIFACTS={self.root}): "
                                     f"{_reason(exc)}") from exc
        return path.as_uri()

    def uri_of(self, key: str) -> str:
        """The URI `put(key, ...)` returns, without writing anything."""
        return self._path(key).as_uri()

    def _from_uri(self, uri: str) -> Path:
        if uri.startswith("file://"):
            return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
        return Path(uri)

    def get(self, uri: str) -> bytes:
        path = self._from_uri(uri)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ArtifactStoreError(f"cannot read artifact {path}: {_reason(exc)}") from exc

    def delete(self, uri: str) -> None:
        with contextlib.suppress(Exception):
            self._from_uri(uri).unlink(missing_ok=True)


class S3ArtifactStore:
    """Objects in an S3-compatible bucket (AWS, MinIO, Ceph...), through boto3.

    URL: `s3://bucket/prefix`, with optional query `endpoint_url=...&region=...`. Credentials come
    from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile, instance role).
    """

    def __init__(self, url: str):
        try:
            import boto3
        except ImportError:
            raise ArtifactStoreError(
                f"the S3 artifact store ({url}) needs boto3, which is not installed: "
                "pip install 'lineguard[s3]' (or pip install boto3==1.44.5)") from None
        parsed = urllib.parse.urlparse(url)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = boto3.client("s3", endpoint_url=query.get("endpoint_url"), region_name=query.get("region"))

    def _key(self, key: str) -> str:
        parts = [safe_name(part) for part in key.split("/")]
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def put(self, key: str, data: bytes) -> str:
        object_key = self._key(key)
        try:
            self._client.put_object(Bucket=self.bucket, Key=object_key, Body=data)
        except Exception as exc:  # botocore raises many types; all mean "not stored"
            raise ArtifactStoreError(f"cannot write artifact s3://{self.bucket}/{object_key}: {exc}") from exc
        return f"s3://{self.bucket}/{object_key}"

    def uri_of(self, key: str) -> str:
        """The URI `put(key, ...)` returns, without writing anything."""
        return f"s3://{self.bucket}/{self._key(key)}"

    def get(self, uri: str) -> bytes:
        parsed = urllib.parse.urlparse(uri)
        try:
            return self._client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"].read()
        except Exception as exc:
            raise ArtifactStoreError(f"cannot read artifact {uri}: {exc}") from exc

    def delete(self, uri: str) -> None:
        parsed = urllib.parse.urlparse(uri)
        with contextlib.suppress(Exception):
            self._client.delete_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))


def open_artifact_store(location: str) -> ArtifactStore:
    """`s3://...` gives an S3ArtifactStore; anything else is a local directory."""
    if location.startswith("s3://"):
        return S3ArtifactStore(location)
    if location.startswith("file://"):
        location = urllib.parse.urlparse(location).path
    return LocalArtifactStore(location)
