"""Why a request to hive failed, in words: a connection that failed (refused, a name that does
not resolve, each TLS failure and what to do about it), and an answer that is not hive's (an
error of a model server's shape). The client's messages; nothing here does I/O."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, get_args
from urllib.parse import urlsplit

import aiohttp

from hive.models import ErrorCode


def reason(
    exc: aiohttp.ClientConnectionError,
    url: str = "",
    ca_file: str | None = None,
    cert_file: str | None = None,
) -> str:
    """Why a connection failed, short: ``connection refused``, ``no such file or directory``,
    and for TLS what to do about it (``ca_file``/``cert_file``: what this client was given)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return _certificate_reason(exc.certificate_error, ca_file)
    if isinstance(exc, aiohttp.ClientSSLError):
        return _refused_reason(exc)
    reset = isinstance(exc, OSError) and exc.errno == errno.ECONNRESET
    if isinstance(exc, aiohttp.ServerDisconnectedError) or reset:
        if url.startswith("https://") and cert_file:
            return (
                f"it closed the connection without answering: hive refuses this client's "
                f"certificate ({cert_file}) when its tls_client_ca_file did not sign it; pass "
                "one that CA signed with --cert and --key"
            )
        if url.startswith("https://"):
            return (
                "it closed the connection without answering; if hive asks for client "
                "certificates (mutual TLS), pass this client's --cert and --key"
            )
        return (
            "it closed the connection without answering; if hive listens with TLS, "
            "use an https:// URL"
        )
    error = getattr(exc, "os_error", None)
    if isinstance(error, socket.gaierror):
        host = getattr(exc, "host", None) or urlsplit(url).hostname
        return f"cannot resolve the name {host!r} ({error.strerror or error})"
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno).lower()
    return str(exc) or type(exc).__name__


#: OpenSSL's verify codes that mean "not signed by a CA this client trusts".
_UNKNOWN_ISSUER = {2, 18, 19, 20, 21}
_EXPIRED, _NOT_YET_VALID, _HOSTNAME_MISMATCH, _IP_MISMATCH = 10, 9, 62, 64


def _certificate_reason(error: Exception, ca_file: str | None) -> str:
    """Why hive's certificate did not verify, one cause a sentence, and what to do about it."""
    code = getattr(error, "verify_code", None)
    message = getattr(error, "verify_message", None) or getattr(error, "reason", None) or error
    if code == _EXPIRED:
        return (
            "hive's certificate has expired; give hive a new one (its tls_cert_file) and "
            "restart it: no --ca can make an expired certificate good"
        )
    if code == _NOT_YET_VALID:
        return "hive's certificate is not valid yet; check the clocks of this host and hive's"
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        return (
            f"hive's certificate is not for this address ({message}); use the name or address "
            "it was made for in the URL"
        )
    if code in _UNKNOWN_ISSUER:
        where = f"the CA in {ca_file}" if ca_file else "a CA this system trusts"
        return (
            f"hive's certificate is not signed by {where} ({message}); pass the CA that signed "
            "it with --ca or HIVE_CA"
        )
    return (
        f"its certificate is not trusted ({message}); pass the CA that signed it with --ca or "
        "HIVE_CA"
    )


def _refused_reason(exc: aiohttp.ClientSSLError) -> str:
    """Why the TLS handshake failed when hive's certificate was fine: hive refused this
    client's (mutual TLS), or something else went wrong."""
    reason = getattr(exc.os_error, "reason", None) if hasattr(exc, "os_error") else None
    if reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
        return (
            "hive refused this client's certificate: it has expired; pass a current one with "
            "--cert and --key"
        )
    if reason == "WRONG_VERSION_NUMBER":  # what answered speaks plain HTTP, not TLS
        return "it does not speak TLS there; if hive listens without TLS, use an http:// URL"
    if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"):
        return (
            "hive refused this client's certificate: it is not signed by the CA hive trusts "
            "for clients (its tls_client_ca_file); pass one that is with --cert and --key"
        )
    return f"TLS failed ({exc}); for mutual TLS pass this client's --cert and --key"


_ERROR_CODES = frozenset(get_args(ErrorCode))


def hive_error(body: Any) -> bool:
    """Whether ``body`` is an error as hive answers it: ``{"error": {"code", "message"}}``, the
    code one of hive's (an OpenAI-style error has a number there, or none of hive's words)."""
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and error.get("code") in _ERROR_CODES
        and isinstance(error.get("message"), str)
    )


def other_error(body: Any) -> str:
    """Another program's error, short: its message where one is found."""
    error = body.get("error") if isinstance(body, dict) else None
    for source in (error, body):
        if isinstance(source, dict):
            for key in ("message", "detail"):
                if isinstance(source.get(key), str):
                    return repr(source[key][:200])
    if isinstance(error, str):
        return repr(error[:200])
    return "not hive's shape"
