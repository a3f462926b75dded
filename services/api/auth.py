"""Who may call the HTTP API: bearer tokens from the data directory's token store.

`--auth` (or WARDEN_API_AUTH) says what needs a token:

- `operators` (default): reads are open; submitting a job needs a client or operator token,
  operator commands an operator token.
- `all`: reads need a token too (any role).
- `off`: nothing needs one, and only a loopback bind may run that way. A request without a token
  acts as `anonymous`; one with a token must still present a valid one.

The dashboard's page and static files, `/openapi.json` and `/metrics` (aggregate counts and
latencies, no names or ids; Prometheus scrapes it) are always open.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from shared.tokens import ANONYMOUS, Identity, TokenStore

AuthMode = Literal["operators", "all", "off"]
AUTH_MODES: tuple[AuthMode, ...] = ("operators", "all", "off")
AUTH_ENV = "WARDEN_API_AUTH"
TOKENS_ENV = "WARDEN_API_TOKENS"
DEFAULT_AUTH: AuthMode = "operators"

# What a request wants to do; the roles that may do it.
Need = Literal["read", "submit", "operate"]
ALLOWED: dict[Need, frozenset[str]] = {
    "read": frozenset({"operator", "client"}),
    "submit": frozenset({"operator", "client"}),
    "operate": frozenset({"operator"}),
}
REALM = 'Bearer realm="warden"'


class BadAuthSetting(ValueError):
    """Raised for an unknown --auth value, or `off` on an address other machines can reach."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_setting(mode: str, host: str) -> AuthMode:
    if mode not in AUTH_MODES:
        raise BadAuthSetting(f"--auth must be one of {', '.join(AUTH_MODES)}; got {mode!r}")
    if mode == "off" and not is_loopback(host):
        raise BadAuthSetting(
            f"--auth off serves the API without any credential, so it is allowed only on a loopback "
            f"address (127.0.0.1, ::1, localhost), not on {host}"
        )
    return mode


@dataclass(frozen=True)
class Denied:
    """A refusal: 401 (no or bad credential, with WWW-Authenticate) or 403 (not allowed)."""

    status: int
    message: str
    challenge: str = ""


@dataclass
class Auth:
    mode: AuthMode
    store: TokenStore

    def check(self, request: Request, need: Need) -> Identity | Denied | None:
        """The caller's identity; None for an open read; a Denied saying why not.

        Raises TokenStoreError when the store cannot be read: the caller answers 503, never
        lets the request in.
        """
        header = request.headers.get("authorization")
        if header is None:
            if self.mode == "off":
                return Identity(name=ANONYMOUS, role="operator")
            if need == "read" and self.mode == "operators":
                return None
            return Denied(401, f"this endpoint needs a bearer token ({_how(need)})", REALM)
        if need == "read" and self.mode == "operators":
            return None  # open reads ignore credentials: a stale token never blocks the dashboard
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return Denied(
                401, "the Authorization header must be `Bearer TOKEN`", f'{REALM}, error="invalid_request"'
            )
        identity = self.store.verify(token)
        if identity is None:
            return Denied(401, "unknown or removed token", f'{REALM}, error="invalid_token"')
        if self.mode != "off" and identity.role not in ALLOWED[need]:
            return Denied(
                403,
                f"{identity.name} holds a {identity.role} token, which may not {_verb(need)} ({_how(need)})",
            )
        return identity


def _how(need: Need) -> str:
    if need == "operate":
        return "an operator token: `warden creds add-operator NAME`"
    return "a token: `warden creds add-operator NAME` or `warden creds add-client NAME`"


def _verb(need: Need) -> str:
    return {"read": "read", "submit": "submit jobs", "operate": "give operator commands"}[need]
