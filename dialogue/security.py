"""What the dialogue service adds to every response and to every failed sign-in.

- `install_security(app)`: a pure ASGI wrapper (BaseHTTPMiddleware would buffer SSE) outside every
  other layer, so the console, static files, /api, 404s and even the 500s of Starlette's error middleware
  carry a Content-Security-Policy the console passes (it has no inline script or style; images are blob:
  URLs), `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY` with `frame-ancestors 'none'` and
  `Referrer-Policy: no-referrer`. /api JSON also gets `Cache-Control: no-store`.
- `AuthFailures`: failed authentication (missing, unknown, revoked or expired token) per client address.
  Past `auth_failure_limit` failures in `auth_failure_window_s` (a token bucket that refills at that rate)
  a request with a bad token gets 429 with Retry-After instead of 401, before any other work. A valid token
  from the same address still passes: behind a shared proxy address, one guesser must not lock out a line.
  `LockoutGate` answers a locked-out address's bad tokens with 429 before the body is read or a route runs.

    >>> install_security(app)          # the headers, and the lock-out gate below
    >>> raise AuthFailures(limit=20, window_s=60).refusal(request)   # 401, or 429 once over the limit
"""

from __future__ import annotations

from fastapi import HTTPException, Request, status
from fastapi.responses import JSONResponse

from dialogue.auth import RateLimiter

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                           "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CONTENT_SECURITY_POLICY.encode()), (b"x-content-type-options", b"nosniff"),
           (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]
OWN = {name for name, _ in HEADERS}
TOO_MANY = "too many failed sign-ins from this address; wait before trying again"


class SecurityHeaders:
    """ASGI middleware: the headers above on every HTTP response; `no-store` on /api JSON."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = scope["path"].startswith("/api")

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in OWN]
                headers += HEADERS
                if api and any(k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in headers):
                    headers = [(k, v) for k, v in headers if k.lower() != b"cache-control"]
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


class LockoutGate:
    """ASGI middleware: an /api request from a locked-out address whose token is not valid gets 429 at once,
    before its body is read or a route runs. (Counting failures is the `requires` dependency's job.)"""

    def __init__(self, app, service_app):
        self.app = app
        self.service_app = service_app   # the FastAPI app: its state.service has the tokens and the counts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api"):
            service = self.service_app.state.service
            address = (scope.get("client") or ("unknown",))[0]
            wait_s = service.auth_failures.locked_for(address)
            if wait_s > 0 and not _valid(service.tokens, scope):
                response = JSONResponse({"detail": TOO_MANY}, status.HTTP_429_TOO_MANY_REQUESTS,
                                        headers={"Retry-After": _seconds(wait_s)})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _valid(tokens, scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and tokens.verify(token.strip()) is not None
    return False


def install_security(app) -> None:
    """Wrap the app's whole middleware stack, Starlette's ServerErrorMiddleware included (app.add_middleware
    would sit inside it, and its 500s would go out bare): security headers outside, the lock-out gate inside."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: SecurityHeaders(LockoutGate(build(), app))


class AuthFailures:
    """Failed authentications per client address: `limit` at once, refilled at limit / window_s per second."""

    def __init__(self, limit: int, window_s: float):
        self.limiter = RateLimiter(per_minute=limit * 60.0 / window_s, burst=limit)

    def locked_for(self, address: str) -> float:
        """Seconds until `address` may fail again (0: it may now), without counting anything."""
        return self.limiter.wait(address)

    def refusal(self, request: Request) -> HTTPException:
        """The error for a request whose token failed: 401 while the address is under its limit, else 429."""
        address = request.client.host if request.client else "unknown"
        wait_s = self.limiter.take(address)
        if wait_s > 0:   # the request log has the 429s; no second line per refused guess
            return HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, TOO_MANY, headers={"Retry-After": _seconds(wait_s)})
        return HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
                             headers={"WWW-Authenticate": "Bearer"})


def _seconds(wait_s: float) -> str:
    return str(max(1, round(wait_s + 0.5)))
