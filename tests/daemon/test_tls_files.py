"""TLS files that cannot be used are one sentence naming the file and what is wrong with it: the
CLI's ``--ca/--cert/--key`` (exit 2, before any connection) and hive's ``tls_*_file`` keys (start
fails). OpenSSL's own words (``PEM lib``, ``KEY_VALUES_MISMATCH``,
``NO_CERTIFICATE_OR_CRL_FOUND``) name no file. Certificates are made here by ``openssl``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hivetest import Hive

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two self-signed certificates with their keys (a, b), a's key encrypted, and junk."""
    d = tmp_path_factory.mktemp("tlsfiles")
    for name in ("a", "b"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
                cwd=d)  # fmt: skip
    openssl("pkey", "-in", "a.key", "-aes256", "-passout", "pass:secret", "-out", "enc.key", cwd=d)
    (d / "junk.txt").write_text("not a certificate\n")
    return d


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI at an https:// URL nothing listens on: these fail before connecting."""
    return subprocess.run(
        [*Hive.cli_command(), "--url", "https://127.0.0.1:9", *args, "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def usage(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stderr.strip()


def test_cli_names_the_file_and_what_is_wrong(files: Path) -> None:
    a, a_key, b_key = files / "a.pem", files / "a.key", files / "b.key"
    junk, enc = files / "junk.txt", files / "enc.key"

    assert usage(cli("--ca", str(junk))) == (
        f"hive: --ca {junk} holds no PEM certificate (a CA file begins with "
        "-----BEGIN CERTIFICATE-----)"
    )
    assert (
        usage(cli("--ca", str(files / "nope.pem"))) == f"hive: --ca {files}/nope.pem: no such file"
    )
    assert usage(cli("--ca", str(a), "--cert", str(a))) == (
        f"hive: --cert {a} holds no private key: give its key with --key"
    )
    assert usage(cli("--ca", str(a), "--cert", str(a), "--key", str(b_key))) == (
        f"hive: --key {b_key} is not the key of the certificate --cert {a}"
    )
    assert usage(cli("--ca", str(a), "--cert", str(a), "--key", str(junk))) == (
        f"hive: --key {junk} holds no PEM private key"
    )
    assert usage(cli("--ca", str(a), "--cert", str(a_key), "--key", str(a_key))) == (
        f"hive: --cert {a_key} holds no PEM certificate (it is a key: give the certificate, "
        "and the key with --key)"
    )
    assert usage(cli("--ca", str(a), "--cert", str(a), "--key", str(enc))) == (
        f"hive: --key {enc} is encrypted with a pass phrase, which hive does not ask for: "
        "decrypt it (openssl pkey -in KEY -out KEY.plain)"
    )
    assert usage(cli("--ca", str(a), "--key", str(a_key))) == (
        "hive: --key is the key of a client certificate: give --cert too"
    )


@pytest.mark.parametrize(
    ("cert", "key", "said"),
    [
        ("nope.pem", "a.key", "tls_cert_file {d}/nope.pem: no such file"),
        ("a.pem", "b.key", "tls_key_file {d}/b.key is not the key of the certificate "
         "tls_cert_file {d}/a.pem"),
        ("junk.txt", "a.key", "tls_cert_file {d}/junk.txt holds no PEM certificate"),
    ],
)  # fmt: skip
def test_hive_names_the_tls_file_that_stops_it(files: Path, cert: str, key: str, said: str) -> None:
    hive = Hive(f'tls_cert_file = "{files / cert}"\ntls_key_file = "{files / key}"\n')
    try:
        proc = hive.launch()
        assert proc.wait(30) == 1
        assert f"cannot use the TLS files: {said.format(d=files)}" in hive.log()
    finally:
        hive.cleanup()
