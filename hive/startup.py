"""What hive checks and claims before it serves: the API token, the unix socket, the TCP
listener's TLS files. Each failure is a :class:`StartupError` whose message says why in one
line; ``hive serve`` prints it and exits 1."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import ssl
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from hive.config import Config
from hive.tlsfiles import TLSFileError, load_ca, load_chain

log = logging.getLogger("hive")


class StartupError(Exception):
    """hive cannot start; the message says why in one line."""


#: The shortest API token hive accepts: anything shorter is guessable, or empty by mistake.
MIN_TOKEN = 16


def token_source(config: Config) -> Literal["config", "HIVE_TOKEN", "file"]:
    """Where the API token comes from: config ``token``, else ``$HIVE_TOKEN``, else the token
    file (``config.token_path``)."""
    if config.token:
        return "config"
    if os.environ.get("HIVE_TOKEN"):
        return "HIVE_TOKEN"
    return "file"


def load_token(config: Config) -> str:
    """The API token, from :func:`token_source` (a missing token file is made, 0600).

    A token shorter than :data:`MIN_TOKEN` characters (an empty file, an unset variable
    written out) stops start-up with a sentence that names where it came from."""
    source = token_source(config)
    if source == "config":
        return _long_enough(config.token or "", "the configuration's token")
    if source == "HIVE_TOKEN":
        return _long_enough(os.environ["HIVE_TOKEN"], "HIVE_TOKEN")
    path = config.token_path
    try:
        return _long_enough(path.read_text().strip(), f"the token file {path}")
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot read the token file {path}: {exc.strerror}") from None
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another hive made it first
        return _long_enough(path.read_text().strip(), f"the token file {path}")
    except OSError as exc:
        raise StartupError(f"cannot create the token file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    log.info("created API token file %s", path)
    return token


def _long_enough(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN:
        held = "is empty" if not token else f"holds a token of {len(token)} characters"
        raise StartupError(
            f"{where} {held}; hive needs at least {MIN_TOKEN} (make one with: "
            "openssl rand -base64 32)"
        )
    return token


def warn_root_workers(config: Config) -> None:
    """When hive runs as root, say which backends' workers would run as root too: hive keeps
    them to their own heartbeat on the socket by its own record of the processes it started,
    but a root process can still read the token file or do anything else on the host."""
    if os.geteuid() != 0:
        return
    bare = sorted(name for name, backend in config.backends.items() if backend.user is None)
    if bare:
        log.warning(
            "hive runs as root and backend(s) %s set no user: their workers run as root and can "
            "do anything on this host (read the API token, leave their cgroup); "
            'set user = "..." in each backend (docs/deploy.md)',
            ", ".join(bare),
        )


def claim_socket(path: Path) -> None:
    """Remove a stale socket; refuse if another hive is answering on it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
    else:
        raise StartupError(f"another hive is already listening on {path}")
    finally:
        probe.close()


def server_tls(
    config: Config, on_failure: Callable[[str, str], None] | None = None
) -> ssl.SSLContext | None:
    """The TCP listener's TLS, from ``tls_cert_file``/``tls_key_file`` (and, for mutual TLS,
    ``tls_client_ca_file``); None for plain HTTP. A file that cannot be used stops start-up.
    ``on_failure`` hears of each handshake that fails (:class:`HandshakeFailures`)."""
    if config.tls_cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        key = None if config.tls_key_file is None else str(config.tls_key_file)
        load_chain(context, str(config.tls_cert_file), key, "tls_cert_file", "tls_key_file")
        if config.tls_client_ca_file is not None:
            load_ca(context, str(config.tls_client_ca_file), "tls_client_ca_file")
            context.verify_mode = ssl.CERT_REQUIRED
    except TLSFileError as exc:
        raise StartupError(f"cannot use the TLS files: {exc}") from None
    if on_failure is not None:
        context.sslobject_class = _reporting(on_failure)
    return context


def _reporting(on_failure: Callable[[str, str], None]) -> type[ssl.SSLObject]:
    """An ``SSLObject`` (what asyncio's TLS drives, ``SSLContext.sslobject_class``) that tells
    ``on_failure(reason, detail)`` of a handshake that failed; asyncio itself says nothing.

    A client that sends an alert (curl, OpenSSL) fails ``do_handshake`` with OpenSSL's reason.
    One that just closes the connection (Python's asyncio and aiohttp do, when they do not trust
    hive's certificate) never reaches it again: its object is told when it is freed with the
    handshake unfinished (:data:`CLOSED`)."""

    class Reporting(ssl.SSLObject):
        _unfinished: weakref.finalize | None = None

        def do_handshake(self) -> None:
            if self._unfinished is None:
                self._unfinished = weakref.finalize(self, on_failure, CLOSED, _MEANING[CLOSED])
                self._unfinished.atexit = False
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # not a failure: the handshake goes on when more bytes come
            except ssl.SSLError as exc:
                self._unfinished.detach()
                reason = exc.reason or type(exc).__name__
                detail = getattr(exc, "verify_message", None) or _MEANING.get(reason) or str(exc)
                on_failure(reason, detail)
                raise
            self._unfinished.detach()

    return Reporting


#: The reason given for a handshake the client left unfinished (no alert, the connection closed).
CLOSED = "CLOSED_IN_HANDSHAKE"
#: What the commonest handshake failures mean, by OpenSSL's reason.
_MEANING = {
    CLOSED: "the client closed the connection during the handshake (a client that does not "
    "trust hive's certificate, or finds it expired, often does)",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust the CA that signed hive's certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client says a certificate has expired "
    "(hive's tls_cert_file?)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client refused hive's certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client refused hive's certificate",
    "HTTP_REQUEST": "plain HTTP to the TLS port (the client should use https://)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "mutual TLS: the client sent no certificate",
    "CERTIFICATE_VERIFY_FAILED": "mutual TLS: the client's certificate did not verify",
}


class HandshakeFailures:
    """Failed TLS handshakes on the API's port: each counted by OpenSSL's reason (``count``),
    and logged at most once a minute per reason, with how many came since the last line."""

    def __init__(
        self, count: Callable[[str], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._count = count
        self._clock = clock
        self._logged: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def __call__(self, reason: str, detail: str) -> None:
        self._count(reason)
        now = self._clock()
        last = self._logged.get(reason)
        if last is not None and now - last < 60.0:
            self._since[reason] = self._since.get(reason, 0) + 1
            return
        more = self._since.pop(reason, 0)
        self._logged[reason] = now
        log.warning(
            "TLS handshake failed on the API's port: %s (%s)%s",
            detail,
            reason,
            f"; {more} more like it since the last line" if more else "",
        )
