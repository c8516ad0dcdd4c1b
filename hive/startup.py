"""What hive checks and claims before it serves: the API token, the unix socket, the TCP
listener's TLS files. Each failure is a :class:`StartupError` whose message says why in one
line; ``hive serve`` prints it and exits 1."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import ssl
from pathlib import Path

from hive.config import Config

log = logging.getLogger("hive")


class StartupError(Exception):
    """hive cannot start; the message says why in one line."""


def load_token(config: Config) -> str:
    """The API token: config ``token``, else ``$HIVE_TOKEN``, else the token file (made 0600)."""
    if config.token:
        return config.token
    if env := os.environ.get("HIVE_TOKEN"):
        return env
    path = config.token_path
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot read the token file {path}: {exc.strerror}") from None
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another hive made it first
        return path.read_text().strip()
    except OSError as exc:
        raise StartupError(f"cannot create the token file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    log.info("created API token file %s", path)
    return token


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


def server_tls(config: Config) -> ssl.SSLContext | None:
    """The TCP listener's TLS, from ``tls_cert_file``/``tls_key_file`` (and, for mutual TLS,
    ``tls_client_ca_file``); None for plain HTTP. A file that cannot be used stops start-up."""
    if config.tls_cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(config.tls_cert_file), str(config.tls_key_file))
        if config.tls_client_ca_file is not None:
            context.load_verify_locations(str(config.tls_client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot use the TLS files: {exc}") from None
    return context
