"""Artifact stores for images, heatmaps, overlays and label masks: a local directory, or S3.

    >>> store = open_artifact_store("/var/lib/lineguard/artifacts")         # local (default)
    >>> store = open_artifact_store("s3://bucket/prefix?endpoint_url=http://minio:9000")
    >>> uri = store.put(artifact_key("disc", "2026-11-22", "cam-0:000001@line-1", "image.jpg"), jpeg_bytes)
    >>> store.get(uri) == jpeg_bytes
    True

Keys: every key is built by `artifact_key(*parts)`, which percent-encodes each part (anything outside
[A-Za-z0-9._-], a leading '.', and '%' itself), so two different frame ids never share a key and a key reads
back as its parts (`key_parts`). A part whose encoding would pass `KEY_PART_MAX` characters (a file name must
fit in 255 bytes) keeps its first characters and ends in `~` and 16 hex digits of the SHA-256 of the raw part:
still one key per id ('~' appears in no other encoded part). The stores refuse any other key.

URIs: `put` returns the artifact's URI, which the records database stores; `get` and `delete` take such a URI
and refuse one outside the store (a local store's root, symlinks followed; an S3 store's bucket and prefix).
URIs written by earlier versions (whose keys folded ':', '@'... into '_') stay readable.

A write that fails (unwritable directory, full disk, S3 error) raises `ArtifactStoreError` with the
path and the reason; the recorder then stops without committing past the record.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import urllib.parse
from pathlib import Path
from typing import Protocol

KEY_PART_MAX = 240      # characters of one encoded key part: a file name, plus ".tmp" while written, < 255 bytes

_PART = re.compile(r"(?:[A-Za-z0-9_~-]|%[0-9A-F]{2})(?:[A-Za-z0-9._~-]|%[0-9A-F]{2})*")


class StorageError(Exception):
    """The recorder could not save a record durably; the message says what and why."""


class ArtifactStoreError(StorageError):
    """An artifact could not be written or read."""


def key_part(value: str) -> str:
    """One part of an artifact key (a path component), unique per value: whole when its encoding fits in
    KEY_PART_MAX characters (any id of letters, digits, '.', '_', '-'), else its head and a hash of all of it.

        >>> key_part("cam-0:000001@line_1")
        'cam-0%3A000001%40line_1'
    """
    if not value:
        raise ArtifactStoreError("an artifact key part cannot be empty")
    encoded = urllib.parse.quote(value, safe="").replace("~", "%7E")
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]           # never "." or "..", nor a hidden file
    if len(encoded) > KEY_PART_MAX:
        digest = hashlib.sha256(value.encode()).hexdigest()[:16]
        cut = KEY_PART_MAX - 17
        escape = encoded.rfind("%", cut - 2, cut)       # never inside a %XX
        encoded = f"{encoded[:cut if escape < 0 else escape]}~{digest}"
    return encoded


def artifact_key(*parts: str) -> str:
    """The store key of an artifact: its parts (product, day, frame id, file name...), each `key_part`-encoded.

        >>> artifact_key("disc", "2026-11-22", "cam:1", "image.jpg")
        'disc/2026-11-22/cam%3A1/image.jpg'
    """
    if not parts:
        raise ArtifactStoreError("an artifact key needs at least one part")
    return "/".join(key_part(part) for part in parts)


def key_parts(key: str) -> list[str]:
    """The parts `artifact_key` was given (for parts short enough to be kept whole)."""
    return [urllib.parse.unquote(part) for part in key.split("/")]


def _checked_key(key: str) -> list[str]:
    """The components of a key made by `artifact_key`; ArtifactStoreError for any other key."""
    parts = key.split("/")
    if not all(_PART.fullmatch(part) for part in parts):
        raise ArtifactStoreError(f"invalid artifact key {key!r}: build keys with lineguard.artifacts.artifact_key()")
    return parts


class ArtifactStore(Protocol):
    root: str

    def put(self, key: str, data: bytes) -> str: ...

    def get(self, uri: str) -> bytes: ...

    def delete(self, uri: str) -> None: ...

    def uri_of(self, key: str) -> str: ...

    def list(self, prefix: str = "") -> list[str]: ...


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
        return Path(self.root, *_checked_key(key))

    def _inside(self, path: Path, what: str) -> Path:
        """`path` with symlinks resolved, when that lies under the root; ArtifactStoreError otherwise."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root) or resolved == Path(self.root):
            raise ArtifactStoreError(f"refusing to {what} {path}: outside the artifact store {self.root}")
        return resolved

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        self._inside(path, "write")                 # a symlinked directory inside the root may point out
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

    def _from_uri(self, uri: str, what: str) -> Path:
        if uri.startswith("file:"):
            parsed = urllib.parse.urlparse(uri)
            if parsed.netloc not in ("", "localhost"):
                raise ArtifactStoreError(f"refusing to {what} {uri}: not a file of this machine")
            path = Path(urllib.parse.unquote(parsed.path))
        elif "://" in uri:
            raise ArtifactStoreError(f"refusing to {what} {uri}: not a file:// URI of the artifact store {self.root}")
        else:
            path = Path(uri)
        if not path.is_absolute():
            raise ArtifactStoreError(f"refusing to {what} {uri}: not an absolute path")
        return self._inside(path, what)

    def get(self, uri: str) -> bytes:
        path = self._from_uri(uri, "read")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ArtifactStoreError(f"cannot read artifact {path}: {_reason(exc)}") from exc

    def delete(self, uri: str) -> None:
        """Remove the artifact; one already gone is no error, one outside the store is."""
        path = self._from_uri(uri, "delete")
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise ArtifactStoreError(f"cannot delete artifact {path}: {_reason(exc)}") from exc

    def list(self, prefix: str = "") -> list[str]:
        """The URIs of the artifacts whose key starts with the whole parts of `prefix` (all when empty)."""
        top = self._path(prefix) if prefix else Path(self.root)
        if top.is_file():
            return [top.as_uri()]
        found = []
        for folder, _, files in os.walk(top):
            found += [Path(folder, name).as_uri() for name in files if not name.endswith(".tmp")]
        return sorted(found)


class S3ArtifactStore:
    """Objects in an S3-compatible bucket (AWS, MinIO, Ceph, SeaweedFS...), through boto3.

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
        if not self.bucket:
            raise ArtifactStoreError(f"LINEGUARD_STORE_ARTIFACTS={url}: an S3 location needs a bucket (s3://bucket/...)")
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        # a session of its own: the credentials are those of the environment now (boto3's default session keeps
        # the first ones it found for the life of the process)
        self._client = boto3.session.Session().client("s3", endpoint_url=query.get("endpoint_url"),
                                                      region_name=query.get("region"))

    def _key(self, key: str) -> str:
        parts = _checked_key(key)
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def _object_key(self, uri: str, what: str) -> str:
        """The object key of a URI of this store; ArtifactStoreError for another bucket or outside the prefix."""
        parsed = urllib.parse.urlparse(uri)
        key = parsed.path.lstrip("/")
        inside = parsed.scheme == "s3" and parsed.netloc == self.bucket and not parsed.query and not parsed.fragment
        if self.prefix:
            inside = inside and key.startswith(f"{self.prefix}/")
            inner = key.removeprefix(f"{self.prefix}/")
        else:
            inner = key
        if not inside or not all(_PART.fullmatch(part) for part in inner.split("/")):
            raise ArtifactStoreError(f"refusing to {what} {uri}: outside the artifact store {self.root}")
        return key

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
        object_key = self._object_key(uri, "read")
        try:
            return self._client.get_object(Bucket=self.bucket, Key=object_key)["Body"].read()
        except Exception as exc:
            raise ArtifactStoreError(f"cannot read artifact {uri}: {exc}") from exc

    def delete(self, uri: str) -> None:
        """Remove the object; one already gone is no error (S3 says so too), one outside the store is."""
        object_key = self._object_key(uri, "delete")
        try:
            self._client.delete_object(Bucket=self.bucket, Key=object_key)
        except Exception as exc:
            raise ArtifactStoreError(f"cannot delete artifact {uri}: {exc}") from exc

    def list(self, prefix: str = "") -> list[str]:
        """The URIs of the artifacts whose key starts with the whole parts of `prefix` (all when empty)."""
        start = self._key(prefix) if prefix else self.prefix
        found = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                found += [item["Key"] for item in page.get("Contents", [])]
        except Exception as exc:
            raise ArtifactStoreError(f"cannot list artifacts under s3://{self.bucket}/{start}: {exc}") from exc
        # whole parts only: the prefix "disc/cam-1" does not list "disc/cam-10/..."
        return sorted(f"s3://{self.bucket}/{key}" for key in found
                      if not start or key == start or key.startswith(f"{start}/"))


def open_artifact_store(location: str) -> ArtifactStore:
    """`s3://...` gives an S3ArtifactStore; anything else is a local directory."""
    if location.startswith("s3://"):
        return S3ArtifactStore(location)
    if location.startswith("file://"):
        location = urllib.parse.urlparse(location).path
    return LocalArtifactStore(location)
