"""TLS on hive's TCP API, with certificates made here by ``openssl``: a client with the CA is
answered, one without it is refused with a sentence that says what to pass, a wrong CA and an
expired certificate each get a sentence of their own, plain HTTP to the TLS port gets a clear
error, and with mutual TLS a client without its own certificate is refused. hive logs and
counts the handshakes that fail. Workers still heartbeat (over the unix socket)."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hivetest import Hive, running_hive

from harness.waits import wait_for

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both CA-signed; an
    expired server certificate (same key) and another CA that signed nothing of hive's."""
    d = tmp_path_factory.mktemp("tls")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=hive test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=hive test {name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                "-out", f"{name}.pem", cwd=d)  # fmt: skip
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "-1", "-extfile", "server.ext",
            "-out", "expired.pem", cwd=d)  # fmt: skip
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=another CA", "-keyout", "other.key", "-out", "other.pem",
            cwd=d)  # fmt: skip
    return d


@pytest.fixture(scope="module")
def tls_hive(certs: Path) -> Iterator[Hive]:
    config = f'tls_cert_file = "{certs / "server.pem"}"\ntls_key_file = "{certs / "server.key"}"\n'
    with running_hive(config) as hive:
        yield hive


def cli(hive: Hive, *args: str) -> subprocess.CompletedProcess[str]:
    return hive.cli(
        *args, env={"HIVE_URL": f"https://127.0.0.1:{hive.port}", "HIVE_TOKEN": hive.token}
    )


def test_a_client_with_the_ca_is_answered(tls_hive: Hive, certs: Path) -> None:
    r = requests.get(
        f"https://127.0.0.1:{tls_hive.port}/v1/node",
        headers=tls_hive.headers,
        verify=str(certs / "ca.pem"),
        timeout=10,
    )
    assert r.status_code == 200
    assert r.json()["api_url"] == f"https://127.0.0.1:{tls_hive.port}"
    spawned = cli(tls_hive, "--ca", str(certs / "ca.pem"), "spawn", "m", "--id", "tls-a")
    assert spawned.returncode == 0, spawned.stderr
    listed = cli(tls_hive, "--ca", str(certs / "ca.pem"), "list")
    assert listed.returncode == 0, listed.stderr
    assert "tls-a" in listed.stdout and "ready" in listed.stdout
    # The demo worker heartbeats, over the unix socket: hive's certificate is not its concern.
    env = {**tls_hive.env, "HIVE_URL": f"unix://{tls_hive.socket}"}
    shown = subprocess.run(
        [*tls_hive.cli_command(), "show", "tls-a", "--json"], env=env, capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip
    assert '"last_heartbeat_at": null' not in shown.stdout, shown.stdout
    assert cli(tls_hive, "--ca", str(certs / "ca.pem"), "rm", "--force", "tls-a").returncode == 0


def test_a_client_without_the_ca_is_refused_with_what_to_pass(tls_hive: Hive) -> None:
    result = cli(tls_hive, "list")
    assert result.returncode == 1
    assert "hive's certificate is not signed by a CA this system trusts" in result.stderr
    assert "pass the CA that signed it with --ca or HIVE_CA" in result.stderr
    assert "Traceback" not in result.stderr


def test_plain_http_to_the_tls_port_gets_a_clear_error(tls_hive: Hive) -> None:
    result = tls_hive.cli(
        "list", env={"HIVE_URL": f"http://127.0.0.1:{tls_hive.port}", "HIVE_TOKEN": tls_hive.token}
    )
    assert result.returncode == 1
    assert "use an https:// URL" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_mutual_tls_refuses_a_client_without_its_certificate(certs: Path) -> None:
    config = (
        f'tls_cert_file = "{certs / "server.pem"}"\ntls_key_file = "{certs / "server.key"}"\n'
        f'tls_client_ca_file = "{certs / "ca.pem"}"\n'
    )
    with running_hive(config) as hive:
        ca = str(certs / "ca.pem")
        refused = cli(hive, "--ca", ca, "list")
        assert refused.returncode == 1
        assert "pass this client's --cert and --key" in refused.stderr, refused.stderr
        mine = ["--cert", str(certs / "client.pem"), "--key", str(certs / "client.key")]
        accepted = cli(hive, "--ca", ca, *mine, "list")
        assert accepted.returncode == 0, accepted.stderr


def test_mutual_tls_names_the_client_certificate_hive_refuses(certs: Path) -> None:
    """A client certificate that hive's tls_client_ca_file did not sign: hive closes the
    connection; the CLI named --cert and --key as missing, though both were given, and asked
    whether hive was running (issue 29's tour)."""
    config = (
        f'tls_cert_file = "{certs / "server.pem"}"\ntls_key_file = "{certs / "server.key"}"\n'
        f'tls_client_ca_file = "{certs / "ca.pem"}"\n'
    )
    with running_hive(config) as hive:
        other = certs / "other.pem"
        theirs = ["--cert", str(other), "--key", str(certs / "other.key")]
        refused = cli(hive, "--ca", str(certs / "ca.pem"), *theirs, "list")
        assert refused.returncode == 1
        assert refused.stderr == (
            f"hive: cannot reach hive at https://127.0.0.1:{hive.port} (from HIVE_URL): it "
            f"closed the connection without answering: hive refuses this client's certificate "
            f"({other}) when its tls_client_ca_file did not sign it; pass one that CA signed "
            "with --cert and --key\n"
        )


def test_tls_files_that_cannot_be_used_stop_start_up(certs: Path) -> None:
    hive = Hive(
        f'tls_cert_file = "{certs / "nope.pem"}"\ntls_key_file = "{certs / "server.key"}"\n'
    )
    try:
        proc = hive.launch()
        assert proc.wait(30) == 1
        assert "cannot use the TLS files" in hive.log()
    finally:
        hive.cleanup()


def handshake(hive: Hive, ca: Path) -> str:
    """A TLS handshake as OpenSSL's own clients make it (the failure is told to hive in an
    alert); the client's error, or "" if it succeeded."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", hive.port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                return ""
        except ssl.SSLCertVerificationError as exc:
            return str(exc.verify_message)


def failures(hive: Hive, ca: Path) -> dict[str, float]:
    text = requests.get(
        f"https://127.0.0.1:{hive.port}/metrics", headers=hive.headers, verify=str(ca), timeout=10
    ).text
    found = re.findall(r'^hive_tls_handshake_failures_total\{reason="([^"]+)"\} (\S+)', text, re.M)
    return {reason: float(value) for reason, value in found}


def test_a_wrong_ca_has_its_own_sentence_and_hive_counts_the_handshake(
    tls_hive: Hive, certs: Path
) -> None:
    other = certs / "other.pem"
    result = cli(tls_hive, "--ca", str(other), "list")
    assert result.returncode == 1
    assert f"hive's certificate is not signed by the CA in {other}" in result.stderr, result.stderr
    assert "pass the CA that signed it with --ca or HIVE_CA" in result.stderr
    assert "--cert" not in result.stderr and "expired" not in result.stderr
    assert handshake(tls_hive, other) == "unable to get local issuer certificate"
    wait_for(
        lambda: (
            failures(tls_hive, certs / "ca.pem").get("TLSV1_ALERT_UNKNOWN_CA", 0) >= 1
            and failures(tls_hive, certs / "ca.pem").get("CLOSED_IN_HANDSHAKE", 0) >= 1
        ),
        timeout=30,
        interval=0.5,
        what="both failed handshakes counted",
    )
    log = tls_hive.log()
    assert "TLS handshake failed on the API's port: the client does not trust the CA" in log, log


def test_an_expired_certificate_has_its_own_sentence_and_hive_counts_the_handshake(
    certs: Path,
) -> None:
    config = f'tls_cert_file = "{certs / "expired.pem"}"\ntls_key_file = "{certs / "server.key"}"\n'
    with running_hive(config) as hive:
        ca = certs / "ca.pem"
        result = cli(hive, "--ca", str(ca), "list")
        assert result.returncode == 1
        assert "hive's certificate has expired" in result.stderr, result.stderr
        assert "tls_cert_file" in result.stderr
        assert "pass the CA" not in result.stderr and "--cert" not in result.stderr
        assert handshake(hive, ca) == "certificate has expired"
        wait_for(
            lambda: "SSLV3_ALERT_CERTIFICATE_EXPIRED" in hive.log(),
            timeout=30,
            what="hive to log the expired certificate's handshake",
        )
        assert "TLS handshake failed on the API's port: the client says a certificate has " in (
            hive.log()
        )


def test_under_tls_the_only_cookie_a_log_in_sets_is_secure(tls_hive: Hive, certs: Path) -> None:
    right = requests.post(
        f"https://127.0.0.1:{tls_hive.port}/login",
        data={"token": tls_hive.token},
        verify=str(certs / "ca.pem"),
        timeout=10,
    )
    assert right.status_code == 200 and right.json()["session"]
    cookies = right.raw.headers.getlist("Set-Cookie")
    assert cookies and all("Secure" in c and "Max-Age=0" in c for c in cookies), cookies
