"""TLS certificate, key and CA files loaded with errors that say which file and what is wrong.

OpenSSL's own errors name no file (``[SSL] PEM lib``, ``KEY_VALUES_MISMATCH``,
``NO_CERTIFICATE_OR_CRL_FOUND``); the CLI's ``--ca/--cert/--key`` and hive's ``tls_*_file`` keys
both load through here, each passing the name a person typed (``--cert``, ``tls_cert_file``).
"""

from __future__ import annotations

import ssl

#: How much of a file is read to tell a certificate from a key (PEM headers come first).
_PEEK_BYTES = 1 << 20


class TLSFileError(ValueError):
    """A TLS file that cannot be used; the message is one sentence naming it."""


class _Encrypted(Exception):
    """Raised by the password callback: hive and the CLI never prompt for a pass phrase."""


def _no_password() -> str:
    raise _Encrypted


def _peek(name: str, path: str) -> str:
    """The start of ``path`` as text, or a :class:`TLSFileError` saying why it cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read(_PEEK_BYTES).decode("ascii", "replace")
    except FileNotFoundError:
        raise TLSFileError(f"{name} {path}: no such file") from None
    except IsADirectoryError:
        raise TLSFileError(f"{name} {path} is a directory, not a file") from None
    except OSError as exc:
        raise TLSFileError(f"{name} {path}: cannot read it ({exc.strerror})") from None


def _has_certificate(text: str) -> bool:
    return "-----BEGIN CERTIFICATE-----" in text or "-----BEGIN TRUSTED CERTIFICATE-----" in text


def _has_key(text: str) -> bool:
    return "PRIVATE KEY-----" in text


def client_context(
    ca: str | None,
    cert: str | None,
    key: str | None,
    names: tuple[str, str, str] = ("CA file", "certificate", "key"),
) -> ssl.SSLContext:
    """A client's context: ``ca`` (default: the system's CAs) and, for mutual TLS, ``cert`` and
    ``key``; ``names`` are what the three are called in an error (``--ca``, ...)."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError):
        assert ca is not None  # the system's own CAs load without error
        load_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ca, names[0])  # raises, saying why
        raise
    if cert is not None:
        load_chain(context, cert, key, names[1], names[2])
    return context


def load_ca(context: ssl.SSLContext, path: str, name: str) -> None:
    """``context.load_verify_locations(path)``; a :class:`TLSFileError` names ``name`` and
    ``path`` when the file is missing, unreadable or holds no PEM certificate."""
    text = _peek(name, path)
    try:
        context.load_verify_locations(path)
    except (OSError, ssl.SSLError) as exc:
        if not _has_certificate(text) or getattr(exc, "reason", None) in (
            "NO_CERTIFICATE_OR_CRL_FOUND",
        ):
            raise TLSFileError(
                f"{name} {path} holds no PEM certificate (a CA file begins with "
                "-----BEGIN CERTIFICATE-----)"
            ) from None
        raise TLSFileError(f"{name} {path}: {_openssl(exc)}") from None


def load_chain(
    context: ssl.SSLContext,
    cert: str,
    key: str | None,
    cert_name: str,
    key_name: str,
) -> None:
    """``context.load_cert_chain(cert, key)`` (no pass phrase prompt); a :class:`TLSFileError`
    says which of the two files is wrong: missing, not PEM, no key given, an encrypted key,
    or a key that is not the certificate's."""
    cert_text = _peek(cert_name, cert)
    key_text = _peek(key_name, key) if key is not None else cert_text
    try:
        context.load_cert_chain(cert, key, password=_no_password)
        return
    except _Encrypted:
        where = f"{key_name} {key}" if key is not None else f"{cert_name} {cert}"
        raise TLSFileError(
            f"{where} is encrypted with a pass phrase, which hive does not ask for: decrypt it "
            "(openssl pkey -in KEY -out KEY.plain)"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None)
        if not _has_certificate(cert_text):
            message = f"{cert_name} {cert} holds no PEM certificate"
            if _has_key(cert_text):
                message += " (it is a key: give the certificate, and the key with " + key_name + ")"
        elif key is None and not _has_key(cert_text):
            message = f"{cert_name} {cert} holds no private key: give its key with {key_name}"
        elif not _has_key(key_text):
            message = f"{key_name} {key} holds no PEM private key"
        elif reason == "KEY_VALUES_MISMATCH":
            where = f"{key_name} {key}" if key is not None else f"the key in {cert}"
            message = f"{where} is not the key of the certificate {cert_name} {cert}"
        else:
            files = f"{cert_name} {cert}" + (f" and {key_name} {key}" if key is not None else "")
            message = f"cannot use {files}: {_openssl(exc)}"
        raise TLSFileError(message) from None


def _openssl(exc: OSError) -> str:
    """OpenSSL's reason without the ``(_ssl.c:NNNN)`` tail, or the OS error's words."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    return exc.strerror or str(exc)
