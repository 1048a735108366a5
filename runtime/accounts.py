"""Operator-station accounts: users file, password hashing, sessions, login rate limit.

- **Users file** (``users.json``, default beside the service config: ``/etc/edgestad/users.json``;
  ``edgestad users add NAME --role viewer|lead``): one entry per user with its role and a scrypt
  hash (``hashlib.scrypt``, the memory-hard KDF of RFC 7914; n = 2**14, r = 8, p = 1, 16-byte
  random salt), written atomically with file mode 0600. Passwords are never stored or logged.
- **Roles**: ``viewer`` sees the page; ``lead`` may also change thresholds and capture frames.
- **Sessions**: a random 256-bit token in an ``HttpOnly; SameSite=Strict`` cookie, held in
  memory (a restart logs everyone out), 12 h lifetime; every state-changing request must carry
  the session's CSRF token in ``X-CSRF-Token``.
- **Login rate limit**: after 5 failed logins from one address (or for one user name) within
  5 minutes, further attempts are refused with 429 until the window passes.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgestad.files import atomic_write_bytes

from .errors import ConfigError

ROLES = ("viewer", "lead")
USERS_FILE = "users.json"
NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}
MIN_PASSWORD = 8
SESSION_S = 12 * 3600
LOGIN_WINDOW_S = 300.0
LOGIN_MAX_FAILURES = 5


def hash_password(password: str, salt: bytes | None = None, n: int = SCRYPT["n"], r: int = SCRYPT["r"],
                  p: int = SCRYPT["p"]) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(bytes.fromhex(digest)))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


def default_users_path(config: str | os.PathLike | None) -> Path:
    """Beside the service config (``/etc/edgestad/users.json`` for the default config)."""
    from .service import DEFAULT_CONFIG_PATH

    return Path(config or DEFAULT_CONFIG_PATH).parent / USERS_FILE


class Users:
    """The users file. ``Users.load(path)`` raises ConfigError naming the file when it is bad."""

    def __init__(self, path: str | os.PathLike, users: dict | None = None):
        self.path = Path(path)
        self.users: dict[str, dict] = dict(users or {})

    @classmethod
    def load(cls, path: str | os.PathLike, missing_ok: bool = False) -> "Users":
        path = Path(path)
        if not path.exists():
            if missing_ok:
                return cls(path)
            raise ConfigError(f"users file {path} does not exist; add a lead with "
                              f"`edgestad users add NAME --role lead --file {path}`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            users = data["users"]
            if not isinstance(users, dict) or not all(
                    isinstance(u, dict) and u.get("role") in ROLES and isinstance(u.get("hash"), str)
                    for u in users.values()):
                raise ValueError("each user needs a role (viewer or lead) and a hash")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"users file {path}: not a valid edgestad users file ({exc})") from None
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"users file {path}: readable by others (mode {mode:o}); "
                              f"chmod 600 {path}")
        return cls(path, users)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"users": self.users}, indent=2, sort_keys=True).encode() + b"\n"
        atomic_write_bytes(self.path, data, mode=0o600)

    def add(self, name: str, role: str, password: str, replace: bool = False) -> None:
        if not NAME.match(name):
            raise ConfigError(f"user name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if role not in ROLES:
            raise ConfigError(f"--role: must be viewer or lead, got {role!r}")
        if len(password) < MIN_PASSWORD:
            raise ConfigError(f"password: at least {MIN_PASSWORD} characters")
        if name in self.users and not replace:
            raise ConfigError(f"user {name!r} exists in {self.path}; pass --replace to set a new "
                              "password or role")
        self.users[name] = {"role": role, "hash": hash_password(password),
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def remove(self, name: str) -> None:
        if name not in self.users:
            raise ConfigError(f"user {name!r} is not in {self.path}")
        del self.users[name]

    def check(self, name: str, password: str) -> str | None:
        """The user's role when the password is right, else None (same work for unknown users)."""
        user = self.users.get(name)
        if user is None:
            verify_password(password, _DUMMY_HASH)   # no timing hint of which names exist
            return None
        return user["role"] if verify_password(password, user["hash"]) else None


_DUMMY_HASH = hash_password("not a password", salt=b"\0" * 16)


@dataclass
class Session:
    user: str
    role: str
    csrf: str
    expires: float


class Sessions:
    """In-memory sessions and the login rate limit. Thread-safe."""

    def __init__(self, lifetime_s: float = SESSION_S, clock=time.monotonic):
        self.lifetime_s = lifetime_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._failures: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def create(self, user: str, role: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(user, role, secrets.token_urlsafe(24), self.clock() + self.lifetime_s)
        with self._lock:
            self._sessions[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            session = self._sessions.get(token)
            if session is not None and session.expires < self.clock():
                del self._sessions[token]
                return None
            return session

    def end(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)

    def blocked_for(self, *keys: str) -> float:
        """Seconds until another login may be tried for these keys (address, user); 0 if now."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            for key in keys:
                q = self._failures[key]
                while q and q[0] < now - LOGIN_WINDOW_S:
                    q.popleft()
                if len(q) >= LOGIN_MAX_FAILURES:
                    wait = max(wait, q[0] + LOGIN_WINDOW_S - now)
        return wait

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for key in keys:
                self._failures[key].append(now)
