"""Bearer tokens for the HTTP API: one per operator or client service, stored hashed in the data dir.

A token is 32 random bytes (`wdn_` + urlsafe base64), so its sha256 is all the store keeps: a
high-entropy secret cannot be guessed back from its hash, and checking one costs microseconds
(bcrypt's deliberate slowness protects low-entropy passwords, which these are not). Hashes are
compared with `hmac.compare_digest`, against every entry, so timing says nothing about which
one (nearly) matched.

The store is a JSON file (`api-tokens.json`, mode 0600) in the data directory that `warden up`
or `warden run` is given; `warden creds add-operator|add-client|remove-*` edit it, and a running
API notices the change on its next request (a new token works, a removed one stops working, with
no restart).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import msgspec
from msgspec import Struct, field

from shared.topology import AGENT_NAME

TOKENS_FILE = "api-tokens.json"
# Where `warden up` on a loopback address keeps the local operator's token (plain text, 0600):
# the one secret the quick start needs, inside the directory that already holds the whole store.
LOCAL_TOKEN_FILE = "operator-token"
LOCAL_OPERATOR = "local"
# Recorded as the operator when `--auth off` lets a request in without a token.
ANONYMOUS = "anonymous"
PREFIX = "wdn_"

Role = Literal["operator", "client"]
ROLES: tuple[Role, ...] = ("operator", "client")


class TokenStoreError(RuntimeError):
    """Raised when the token file cannot be read or parsed: no request is let in on a guess."""


class BadTokenName(ValueError):
    """Raised for a token name that is not 1-64 letters, digits, `-` or `_` (or is reserved)."""


class TokenEntry(Struct, frozen=True, kw_only=True):
    name: str
    role: Role
    sha256: str
    created_at: datetime


class _File(Struct, kw_only=True):
    version: int = 1
    tokens: list[TokenEntry] = field(default_factory=list)


class Identity(Struct, frozen=True, kw_only=True):
    """Who an authenticated request is: the name recorded in the events it causes."""

    name: str
    role: Role


def tokens_path(data_dir: Path) -> Path:
    return Path(data_dir).resolve() / TOKENS_FILE


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def check_name(name: str) -> str:
    if not AGENT_NAME.match(name):
        raise BadTokenName(f"token name {name!r} must be 1-64 letters, digits, '-' or '_'")
    if name == ANONYMOUS:
        raise BadTokenName(f"{ANONYMOUS!r} is reserved: it names requests let in by --auth off")
    return name


class TokenStore:
    """The token file, re-read whenever it changes on disk (checked by one stat per lookup)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: a store with no tokens (an API started without a data dir)
        self._signature: tuple[int, int, int] | None = None
        self._entries: list[TokenEntry] = []

    def entries(self) -> list[TokenEntry]:
        if self.path is None:
            return []
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._signature, self._entries = None, []
            return []
        except OSError as exc:
            raise TokenStoreError(f"cannot read the API token store {self.path}: {exc}") from exc
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature != self._signature:
            self._entries = self._read()
            self._signature = signature
        return list(self._entries)

    def verify(self, token: str) -> Identity | None:
        """The identity `token` belongs to, or None."""
        presented = digest(token)
        found: TokenEntry | None = None
        for entry in self.entries():
            if hmac.compare_digest(presented, entry.sha256):
                found = entry
        return None if found is None else Identity(name=found.name, role=found.role)

    def add(self, name: str, role: Role) -> str:
        """Issue a token for `name` (replacing its previous one); the token, shown only now."""
        check_name(name)
        token = PREFIX + secrets.token_urlsafe(32)
        with self._editing() as tokens:
            other = next((e for e in tokens if e.name == name and e.role != role), None)
            if other is not None:
                raise BadTokenName(f"{name!r} is already a {other.role} token; remove it first")
            tokens[:] = [e for e in tokens if e.name != name]
            tokens.append(
                TokenEntry(name=name, role=role, sha256=digest(token), created_at=datetime.now(UTC))
            )
        return token

    def remove(self, name: str, role: Role) -> bool:
        """Forget `name`'s token; False when there is no such token of that role."""
        with self._editing() as tokens:
            kept = [e for e in tokens if not (e.name == name and e.role == role)]
            removed = len(kept) != len(tokens)
            tokens[:] = kept
        return removed

    def _read(self) -> list[TokenEntry]:
        assert self.path is not None
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TokenStoreError(f"cannot read the API token store {self.path}: {exc}") from exc
        try:
            return msgspec.json.decode(data, type=_File).tokens
        except msgspec.DecodeError as exc:
            raise TokenStoreError(f"the API token store {self.path} is damaged: {exc}") from exc

    @contextlib.contextmanager
    def _editing(self) -> Iterator[list[TokenEntry]]:
        """Read-modify-write under an exclusive lock; the file is replaced atomically, mode 0600."""
        if self.path is None:
            raise TokenStoreError("this token store has no file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600), "r+b") as lock:
            _owned_like_its_directory(lock_path)
            fcntl.flock(lock, fcntl.LOCK_EX)
            tokens = self._read()
            yield tokens
            write_private(self.path, msgspec.json.format(msgspec.json.encode(_File(tokens=tokens))))
            self._signature = None


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path`, readable only by its owner, replacing any previous file atomically."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        _owned_like_its_directory(tmp)
        with open(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _owned_like_its_directory(path: Path) -> None:
    """As root (compose's `cli` container), hand the file to the data dir's owner: a 0600 file
    owned by root would lock out the API process that has to read it."""
    if os.geteuid() == 0:
        owner = path.parent.stat()
        os.chown(path, owner.st_uid, owner.st_gid)


def local_operator_token(data_dir: Path) -> tuple[str, Path]:
    """The local operator's token (the one in `operator-token` while the store still accepts it,
    otherwise a new one written there); and that file's path."""
    data_dir = Path(data_dir).resolve()
    path = data_dir / LOCAL_TOKEN_FILE
    store = TokenStore(tokens_path(data_dir))
    with contextlib.suppress(FileNotFoundError):
        kept = path.read_text().strip()
        if kept and store.verify(kept) == Identity(name=LOCAL_OPERATOR, role="operator"):
            return kept, path
    token = store.add(LOCAL_OPERATOR, "operator")
    write_private(path, (token + "\n").encode())
    return token, path
