"""Bearer tokens with roles and an optional expiry, a token file that is re-read when it changes, and the
rate limits (per token, and of failed sign-ins per client address).

Tokens are random strings (`secrets.token_urlsafe(32)`) that the service never stores or logs: the token
file holds their SHA-256, and a request's token is hashed and looked up. `lineguard dialogue token create`
writes the file (atomically, mode 0600) and prints the token once; `token list` shows the entries and
`token revoke` removes one:

    {"tokens": [{"name": "alice", "role": "operator", "sha256": "9f86d0...",
                 "created_at": "2026-12-07T13:00:00+00:00", "expires_at": "2026-12-07T21:00:00+00:00"}]}

Tokens may also come from `LINEGUARD_DIALOGUE_TOKENS="operator:alice:TOKEN,viewer:screen-2:TOKEN"` (at least
32 characters each; they never expire and go only with a restart).

Every replica reads the same file (in Kubernetes a mounted Secret): `verify` stats it at most once a second
and loads it again when the resolved file's inode, size or mtime changed, so a revoked or re-issued token
is refused within about a second, with no restart. Expiry is checked on every request.

Roles: `viewer` reads, `operator` reads, asks and labels, `admin` may do everything.

    >>> registry = TokenRegistry.load(path, env_tokens=None)
    >>> registry.verify("the-token")
    Principal(name='alice', role='operator', ...)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from lineguard.events import ID_PATTERN
from lineguard.logging import get_logger
from lineguard.settings import ConfigError

log = get_logger(__name__)

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[str, ...] = ("viewer", "operator", "admin")
RANK = {role: rank for rank, role in enumerate(ROLES)}
MIN_ENV_TOKEN_CHARS = 32
RELOAD_CHECK_S = 1.0      # the token file is stat()ed at most this often on the request path


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the token's name (the operator id on labels) and role."""

    name: str
    role: Role
    key: str = ""   # the token's hash: the rate limit's bucket (never the token itself)
    expires_at: datetime | None = None

    def may(self, role: Role) -> bool:
        return RANK[self.role] >= RANK[role]

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and (now or datetime.now(UTC)) >= self.expires_at


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenRegistry:
    """Hashed tokens -> principals: the token file's (re-read when it changes) and the environment's."""

    def __init__(self, entries: dict[str, Principal], path: Path | None = None,
                 env_entries: dict[str, Principal] | None = None, signature: tuple | None = None):
        self._by_hash = entries
        self.path = path
        self._env = env_entries or {}
        self._signature = signature
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_hash)

    @classmethod
    def load(cls, path: Path | None, env_tokens: str | None = None) -> TokenRegistry:
        """From the token file (when it exists) and the environment's tokens; ConfigError on a bad entry."""
        env_entries = parse_env_tokens(env_tokens)
        signature = _signature(path)
        file_entries = _read_file(path) if signature is not None else {}
        return cls(file_entries | env_entries, path, env_entries, signature)

    def verify(self, token: str) -> Principal | None:
        """The principal of a presented token, or None (unknown, revoked or expired). The lookup is by hash,
        so timing says nothing of it."""
        return self.verify_key(token_hash(token))

    def verify_key(self, digest: str) -> Principal | None:
        """The principal of a token's hash while it is still in the registry and not expired."""
        self.reload_if_changed()
        principal = self._by_hash.get(digest)
        if principal is None or principal.expired():
            return None
        return principal

    def still_valid(self, principal: Principal) -> bool:
        """Whether `principal`'s token is still in the registry and not expired (open streams ask this)."""
        return self.verify_key(principal.key) is not None

    def reload_if_changed(self, force: bool = False) -> None:
        """Load the token file again when the file its path resolves to changed (at most once a second).

        A Kubernetes Secret volume swaps a `..data` symlink: os.stat follows the links, so the new file's
        inode shows. An unreadable file after start-up refuses every file token (and logs why) until it is
        fixed: a revocation must never be undone by a broken edit."""
        now = time.monotonic()
        if self.path is None or (not force and now - self._checked < RELOAD_CHECK_S):
            return
        with self._lock:
            if not force and now - self._checked < RELOAD_CHECK_S:
                return
            self._checked = now
            signature = _signature(self.path)
            if signature == self._signature:
                return
            try:
                file_entries = _read_file(self.path) if signature is not None else {}
            except ConfigError as exc:
                log.error("dialogue_tokens_unreadable", error=str(exc), hint="file tokens refused until fixed")
                file_entries = {}
            self._by_hash = file_entries | self._env
            self._signature = signature
            log.info("dialogue_tokens_reloaded", tokens=len(self._by_hash))


def _signature(path: Path | None) -> tuple | None:
    """(device, inode, size, mtime) of the file `path` resolves to; None when there is none."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _read_file(path: Path) -> dict[str, Principal]:
    entries: dict[str, Principal] = {}
    try:
        data = json.loads(path.read_text())
        for item in data.get("tokens", []):
            digest = str(item["sha256"]).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"token {item.get('name')!r}: sha256 must be 64 hex digits")
            entries[digest] = _principal(item["name"], item["role"], digest, _timestamp(item.get("expires_at")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"LINEGUARD_DIALOGUE_TOKENS_FILE={path}: cannot read the tokens: {exc}") from None
    return entries


def parse_env_tokens(env_tokens: str | None) -> dict[str, Principal]:
    """`role:name:token,...` (LINEGUARD_DIALOGUE_TOKENS) -> principals by hash; ConfigError naming it."""
    entries: dict[str, Principal] = {}
    for spec in filter(None, (s.strip() for s in (env_tokens or "").split(","))):
        role, _, rest = spec.partition(":")
        name, _, token = rest.partition(":")
        if not token:
            raise ConfigError("LINEGUARD_DIALOGUE_TOKENS: expected role:name:token[,role:name:token...]")
        if len(token) < MIN_ENV_TOKEN_CHARS:   # never the token itself in the message
            raise ConfigError(f"LINEGUARD_DIALOGUE_TOKENS: the token of {name!r} has {len(token)} characters; "
                              f"use at least {MIN_ENV_TOKEN_CHARS} random ones (python -c 'import secrets; "
                              f"print(secrets.token_urlsafe(32))')")
        try:
            entries[token_hash(token)] = _principal(name, role, token_hash(token))
        except ValueError as exc:
            raise ConfigError(f"LINEGUARD_DIALOGUE_TOKENS: {exc}") from None
    return entries


def _principal(name: str, role: str, digest: str, expires_at: datetime | None = None) -> Principal:
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(name, str) or not re.match(ID_PATTERN, name) or len(name) > 128:
        raise ValueError(f"token name {name!r} must be 1-128 letters, digits or . _ : @ + -")
    return Principal(name=name, role=role, key=digest, expires_at=expires_at)  # type: ignore[arg-type]


def _timestamp(value) -> datetime | None:
    """An ISO 8601 time as an aware UTC datetime (a naive one is taken as UTC); None stays None."""
    if value is None or value == "":
        return None
    moment = datetime.fromisoformat(str(value))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


# --- the token file (lineguard dialogue token create | list | revoke) -----------------------------------

DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `8h`, `7d`, `2w` -> a timedelta; ValueError otherwise."""
    match = DURATION.match(text)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"expected a positive duration like 30m, 8h or 7d, got {text!r}")
    return timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])


def parse_expiry(text: str) -> datetime:
    """An ISO 8601 time (naive = UTC) in the future; ValueError otherwise."""
    moment = _timestamp(text)
    if moment <= datetime.now(UTC):
        raise ValueError(f"{text!r} is not in the future")
    return moment


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside the token file, so that two commands cannot lose each other's change."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _entries(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("tokens", []))


def _write(path: Path, entries: list[dict]) -> None:
    """The whole file at once: a 0600 temp file beside it, fsync'ed, then os.replace (readers see the old
    file or the new one, never half of one)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")   # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"tokens": entries}, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_token(path: Path, name: str, role: str, expires_at: datetime | None = None) -> str:
    """Make a new token, store its hash in the token file (replacing any token of the same name) and return
    the token (shown once)."""
    token = secrets.token_urlsafe(32)
    principal = _principal(name, role, token_hash(token), expires_at)
    entry = {"name": principal.name, "role": principal.role, "sha256": principal.key,
             "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
             "expires_at": expires_at.astimezone(UTC).isoformat(timespec="seconds") if expires_at else None}
    with _locked(path):
        _write(path, [t for t in _entries(path) if t.get("name") != name] + [entry])
    return token


def list_tokens(path: Path) -> list[dict]:
    """The token file's entries (name, role, created_at, expires_at, expired), without the hashes."""
    now = datetime.now(UTC)
    listed = []
    for item in _entries(path):
        expires_at = _timestamp(item.get("expires_at"))
        listed.append({"name": item.get("name"), "role": item.get("role"), "created_at": item.get("created_at"),
                       "expires_at": item.get("expires_at"), "expired": expires_at is not None and now >= expires_at})
    return listed


def revoke_token(path: Path, name: str) -> bool:
    """Remove the token of `name` from the token file; False when there was none."""
    with _locked(path):
        entries = _entries(path)
        kept = [t for t in entries if t.get("name") != name]
        if len(kept) == len(entries):
            return False
        _write(path, kept)
    return True


class RateLimiter:
    """A token bucket per key: `burst` requests at once, refilled at `per_minute` / 60 per second."""

    def __init__(self, per_minute: float, burst: int, max_keys: int = 100_000):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                self._prune(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def wait(self, key: str) -> float:
        """The seconds until `key` may go ahead (0: now), taking nothing."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Forget full buckets once there are many keys (client addresses are not a bounded set)."""
        if len(self._buckets) <= self.max_keys:
            return
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
