"""Bearer tokens with roles, and a per-token rate limit.

Tokens are random strings (`secrets.token_urlsafe(32)`) that the service never stores or logs: the token
file holds their SHA-256, and a request's token is hashed and looked up. The file is written by
`lineguard dialogue token --role operator --name alice` (which prints the token once):

    {"tokens": [{"name": "alice", "role": "operator", "sha256": "9f86d0..."}]}

Tokens may also come from `LINEGUARD_DIALOGUE_TOKENS="operator:alice:TOKEN,viewer:screen-2:TOKEN"`.

Roles: `viewer` reads, `operator` reads, asks and labels, `admin` may do everything.

    >>> registry = TokenRegistry.load(path, env_tokens=None)
    >>> registry.verify("the-token")
    Principal(name='alice', role='operator')
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lineguard.events import ID_PATTERN
from lineguard.settings import ConfigError

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[str, ...] = ("viewer", "operator", "admin")
RANK = {role: rank for rank, role in enumerate(ROLES)}


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the token's name (the operator id on labels) and role."""

    name: str
    role: Role
    key: str = ""   # the token's hash: the rate limit's bucket (never the token itself)

    def may(self, role: Role) -> bool:
        return RANK[self.role] >= RANK[role]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenRegistry:
    """Hashed tokens -> principals."""

    def __init__(self, entries: dict[str, Principal]):
        self._by_hash = entries

    def __len__(self) -> int:
        return len(self._by_hash)

    @classmethod
    def load(cls, path: Path | None, env_tokens: str | None = None) -> TokenRegistry:
        """From the token file (when it exists) and the environment's tokens; ConfigError on a bad entry."""
        entries: dict[str, Principal] = {}
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                for item in data.get("tokens", []):
                    digest = str(item["sha256"]).lower()
                    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                        raise ValueError(f"token {item.get('name')!r}: sha256 must be 64 hex digits")
                    entries[digest] = _principal(item["name"], item["role"], digest)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(f"LINEGUARD_DIALOGUE_TOKENS_FILE={path}: cannot read the tokens: {exc}") from None
        for spec in filter(None, (s.strip() for s in (env_tokens or "").split(","))):
            role, _, rest = spec.partition(":")
            name, _, token = rest.partition(":")
            if not token:
                raise ConfigError("LINEGUARD_DIALOGUE_TOKENS: expected role:name:token[,role:name:token...]")
            try:
                entries[token_hash(token)] = _principal(name, role, token_hash(token))
            except ValueError as exc:
                raise ConfigError(f"LINEGUARD_DIALOGUE_TOKENS: {exc}") from None
        return cls(entries)

    def verify(self, token: str) -> Principal | None:
        """The principal of a presented token, or None. The lookup is by hash, so timing says nothing of it."""
        return self._by_hash.get(token_hash(token))


def _principal(name: str, role: str, digest: str) -> Principal:
    import re

    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(name, str) or not re.match(ID_PATTERN, name) or len(name) > 128:
        raise ValueError(f"token name {name!r} must be 1-128 letters, digits or . _ : @ + -")
    return Principal(name=name, role=role, key=digest)  # type: ignore[arg-type]


def create_token(path: Path, name: str, role: str) -> str:
    """Make a new token, add its hash to the token file (created 0600) and return the token (shown once)."""
    token = secrets.token_urlsafe(32)
    principal = _principal(name, role, token_hash(token))
    data = {"tokens": []}
    if path.exists():
        data = json.loads(path.read_text())
    data["tokens"] = [t for t in data.get("tokens", []) if t.get("name") != name] + [
        {"name": principal.name, "role": principal.role, "sha256": principal.key}]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)
    return token


class RateLimiter:
    """A token bucket per key: `burst` requests at once, refilled at `per_minute` / 60 per second."""

    def __init__(self, per_minute: int, burst: int):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
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
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
