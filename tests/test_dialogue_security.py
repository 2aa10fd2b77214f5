"""Security of the dialogue service (`lineguard dialogue`), on the real app under a real uvicorn, the real
`lineguard` CLI and the real token file:

- a token re-issued under the same name, revoked with `lineguard dialogue token revoke`, or past its expiry is
  refused within 5 s with no restart, and an open SSE stream of it is closed within 5 s;
- environment tokens shorter than 32 characters stop the service at start-up, naming the variable;
- repeated bad tokens from one address get 429 with Retry-After (never 500), while valid tokens pass;
- every response (console, static files, /api, errors) carries the security headers; /api JSON is no-store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from dialogue_helpers import TOKENS, dialogue_settings_for, serve, status_within, storage_settings_for

from dialogue.auth import create_token, revoke_token, token_hash
from dialogue.settings import load_dialogue_settings
from lineguard.settings import ConfigError

WITHIN_S = 5.0


@contextlib.contextmanager
def running(settings, tmp_path, **overrides):
    """The real service on an empty records database, with the helpers' tokens: (service, client, token file)."""
    dialogue_settings = dialogue_settings_for(tmp_path / "dialogue", **overrides)
    with serve(settings, storage_settings_for(tmp_path), dialogue_settings) as service, \
            httpx.Client(base_url=service.base_url, timeout=30) as client:
        yield service, client, dialogue_settings.tokens_file


def cli(*args: str, tokens_file, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ) | {"LINEGUARD_STATE_DIR": str(tmp_path / "cli-state"), "LINEGUARD_LOG_JSON": "1",
                              "LINEGUARD_DIALOGUE_TOKENS_FILE": str(tokens_file)}
    return subprocess.run([sys.executable, "-m", "deploy", "dialogue", "token", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_reissued_and_revoked_tokens_are_refused_within_seconds_without_a_restart(settings, tmp_path):
    with running(settings, tmp_path) as (service, client, tokens_file):
        old = create_token(tokens_file, "carol", "operator")            # added while the service runs
        code, took = status_within(client, "/api/me", old, 200)
        assert code == 200 and took <= WITHIN_S, f"a new token was refused for {took:.1f} s"
        new = create_token(tokens_file, "carol", "operator")            # re-issued under the same name
        code, took = status_within(client, "/api/me", old, 401)
        assert code == 401 and took <= WITHIN_S, f"the old token still worked after {took:.1f} s"
        assert client.post("/api/records/part-1/label", json={"is_defect": True},
                           headers={"Authorization": f"Bearer {old}"}).status_code == 401   # it labels nothing
        code, took = status_within(client, "/api/me", new, 200)
        assert code == 200 and took <= WITHIN_S
        assert client.get("/api/me", headers={"Authorization": f"Bearer {new}"}).json() == {"name": "carol",
                                                                                             "role": "operator"}

        revoked = cli("revoke", "--name", "carol", tokens_file=tokens_file, tmp_path=tmp_path)
        assert revoked.returncode == 0, revoked.stderr
        code, took = status_within(client, "/api/me", new, 401)
        assert code == 401 and took <= WITHIN_S, f"the revoked token still worked after {took:.1f} s"
        assert client.get("/api/me", headers=service.headers("viewer")).status_code == 200   # the others stay
        again = cli("revoke", "--name", "carol", tokens_file=tokens_file, tmp_path=tmp_path)
        assert again.returncode == 2 and "no token named 'carol'" in again.stderr


def test_the_token_commands_store_hashes_with_expiry_and_list_without_them(tmp_path):
    tokens_file = tmp_path / "tokens" / "dialogue-tokens.json"
    created = cli("create", "--role", "viewer", "--name", "screen-9", "--expires-in", "8h", tokens_file=tokens_file,
                  tmp_path=tmp_path)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    alias = cli("--role", "operator", "--name", "dave", tokens_file=tokens_file, tmp_path=tmp_path)  # the old form
    assert alias.returncode == 0, alias.stderr
    text = tokens_file.read_text()
    assert token not in text and alias.stdout.strip() not in text and token_hash(token) in text
    assert oct(os.stat(tokens_file).st_mode & 0o777) == "0o600"
    entries = {e["name"]: e for e in json.loads(text)["tokens"]}
    expires = datetime.fromisoformat(entries["screen-9"]["expires_at"])
    assert abs(expires - datetime.now(UTC) - timedelta(hours=8)) < timedelta(minutes=5)
    assert entries["dave"]["expires_at"] is None and datetime.fromisoformat(entries["dave"]["created_at"])
    listed = cli("list", "--json", "--file", str(tokens_file), tokens_file=tmp_path / "elsewhere.json",
                 tmp_path=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [(e["name"], e["role"], e["expired"]) for e in json.loads(listed.stdout)] == \
           [("screen-9", "viewer", False), ("dave", "operator", False)]
    assert token_hash(token) not in listed.stdout
    for bad in (["--expires-in", "8 parsecs"], ["--expires-at", "2020-01-01T00:00:00"]):
        refused = cli("create", "--role", "viewer", "--name", "x", *bad, tokens_file=tokens_file, tmp_path=tmp_path)
        assert refused.returncode == 2 and bad[0] in refused.stderr
    assert [e["name"] for e in json.loads(tokens_file.read_text())["tokens"]] == ["screen-9", "dave"]
    assert not list(tokens_file.parent.glob("*.tmp"))


def test_an_expired_token_is_refused(settings, tmp_path):
    with running(settings, tmp_path) as (service, client, tokens_file):
        expired = create_token(tokens_file, "erin", "viewer", expires_at=datetime.now(UTC) - timedelta(seconds=1))
        soon = create_token(tokens_file, "frank", "viewer", expires_at=datetime.now(UTC) + timedelta(seconds=4))
        assert status_within(client, "/api/me", soon, 200)[0] == 200
        assert client.get("/api/me", headers={"Authorization": f"Bearer {expired}"}).status_code == 401
        # the file does not change again: expiry itself is checked on every request
        code, took = status_within(client, "/api/me", soon, 401, timeout_s=4 + WITHIN_S)
        assert code == 401, f"the token still worked {took:.1f} s after it was stored, past its expiry"
        assert client.get("/api/me", headers={"Authorization": f"Bearer {expired}"}).status_code == 401


def _open_stream(client, token: str, ended: dict, opened: threading.Event) -> threading.Thread:
    """Read /api/stream with `token` in a thread; `ended["at"]` is when the server closed it."""

    def read() -> None:
        try:
            with client.stream("GET", "/api/stream", headers={"Authorization": f"Bearer {token}"},
                               timeout=httpx.Timeout(30, read=60)) as response:
                ended["status"] = response.status_code
                opened.set()
                for _ in response.iter_raw():
                    pass
            ended["at"] = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            ended["error"] = repr(exc)
            opened.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _streams(service) -> int:
    return len(service.app.state.service.broadcaster.clients)


def test_open_streams_of_revoked_or_expired_tokens_are_closed_within_seconds(settings, tmp_path):
    with running(settings, tmp_path) as (service, client, tokens_file):
        doomed = create_token(tokens_file, "gina", "viewer")
        brief = create_token(tokens_file, "hank", "viewer", expires_at=datetime.now(UTC) + timedelta(seconds=6))
        brief_expires = time.monotonic() + 6
        assert status_within(client, "/api/me", doomed, 200)[0] == 200
        with httpx.Client(base_url=service.base_url) as streams:
            states = {name: ({}, threading.Event()) for name in ("doomed", "brief", "kept")}
            for name, token in (("doomed", doomed), ("brief", brief), ("kept", TOKENS["viewer"])):
                _open_stream(streams, token, *states[name])
                assert states[name][1].wait(30) and states[name][0].get("status") == 200, states[name][0]
            deadline = time.monotonic() + 30
            while _streams(service) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _streams(service) == 3

            revoked_at = time.monotonic()
            assert revoke_token(tokens_file, "gina")
            doomed_end, _ = states["doomed"]
            while "at" not in doomed_end and "error" not in doomed_end and time.monotonic() < revoked_at + 15:
                time.sleep(0.05)
            assert "at" in doomed_end, doomed_end
            assert doomed_end["at"] - revoked_at <= WITHIN_S, f"closed {doomed_end['at'] - revoked_at:.1f} s after"

            brief_end, _ = states["brief"]
            while "at" not in brief_end and "error" not in brief_end and time.monotonic() < brief_expires + 15:
                time.sleep(0.05)
            assert "at" in brief_end, brief_end
            assert brief_end["at"] - brief_expires <= WITHIN_S, f"closed {brief_end['at'] - brief_expires:.1f} s late"
            assert "at" not in states["kept"][0] and _streams(service) == 1   # the valid one stays open


def test_short_environment_tokens_stop_the_service_at_start_up(tmp_path):
    short = "operator:alice:tiny-secret"
    with pytest.raises(ConfigError, match="LINEGUARD_DIALOGUE_TOKENS") as error:
        from dialogue.auth import TokenRegistry

        TokenRegistry.load(None, env_tokens=short)
    assert "tiny-secret" not in str(error.value) and "32" in str(error.value)

    env = dict(os.environ) | {"LINEGUARD_STATE_DIR": str(tmp_path), "LINEGUARD_LOG_JSON": "1",
                              "LINEGUARD_DIALOGUE_TOKENS": short, "LINEGUARD_DIALOGUE_ANSWERER": "template"}
    started = subprocess.run([sys.executable, "-m", "deploy", "dialogue", "--port", "0"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert started.returncode == 2, started.stderr
    assert started.stderr.startswith("error: ") and "LINEGUARD_DIALOGUE_TOKENS: the token of 'alice' has 11 " \
        "characters; use at least 32" in started.stderr and "tiny-secret" not in started.stderr
    with pytest.raises(ConfigError, match="LINEGUARD_DIALOGUE_TOKENS: the token of 'alice'"):
        load_dialogue_settings(tokens=short)
    assert len(TokenRegistry.load(None, env_tokens=f"operator:alice:{secrets.token_urlsafe(24)}")) == 1


def test_repeated_bad_tokens_get_429_with_retry_after_while_valid_tokens_pass(settings, tmp_path):
    limit = load_dialogue_settings().auth_failure_limit
    # the default limit, refilled once an hour here, so the count below does not depend on the machine's speed
    with running(settings, tmp_path, auth_failure_limit=limit, auth_failure_window_s=3600 * limit) as \
            (service, client, _):
        codes, retry_after = [], []
        for _ in range(200):
            response = client.get("/api/records", headers={"Authorization": f"Bearer {secrets.token_urlsafe(32)}"})
            codes.append(response.status_code)
            if response.status_code == 429:
                retry_after.append(int(response.headers["retry-after"]))
        assert codes[:limit] == [401] * limit and codes[limit:] == [429] * (200 - limit)
        assert min(retry_after) >= 1
        assert client.get("/api/records").status_code == 429                       # no token is a bad token
        # locked out before any other work: the body is neither read nor validated, the route never runs
        assert client.post("/api/records/x/questions", content=b"{not json",
                           headers={"Authorization": "Bearer nope", "Content-Type": "application/json"}
                           ).status_code == 429
        # a valid token from the same address still works, and a wrong role is still a 403, not a 429
        assert client.get("/api/records", headers=service.headers("viewer")).status_code == 200
        assert client.post("/api/records/x/questions", json={"question": "Where?"},
                           headers=service.headers("viewer")).status_code == 403
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200


SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def test_every_response_carries_the_security_headers(settings, tmp_path):
    with running(settings, tmp_path) as (service, client, _):
        viewer = service.headers("viewer")
        responses = {"/": client.get("/"), "/static/app.js": client.get("/static/app.js"),
                     "/api/records": client.get("/api/records", headers=viewer),
                     "/api/records/no-such-frame": client.get("/api/records/no-such-frame", headers=viewer),
                     "/api/no-such-route": client.get("/api/no-such-route", headers=viewer),
                     "/no-such-page": client.get("/no-such-page"), "/api/me (no token)": client.get("/api/me"),
                     "/healthz": client.get("/healthz")}
        assert [r.status_code for r in responses.values()] == [200, 200, 200, 404, 404, 404, 401, 200]
        for path, response in responses.items():
            for name, value in SECURITY_HEADERS.items():
                assert response.headers.get(name) == value, (path, name, response.headers.get(name))
            policy = response.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy, path
            assert "unsafe-inline" not in policy and "unsafe-eval" not in policy, path
            if path.startswith("/api"):
                assert response.headers["cache-control"] == "no-store", path
        # the console page itself has nothing inline for the policy to block
        page = responses["/"].text.lower()
        assert not re.search(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son[a-z]+=|javascript:", page)
