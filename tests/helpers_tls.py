"""Throwaway certificates for TLS tests, made with the ``openssl`` command.

Every test run makes its own CA, receiver and sender certificates (EC P-256:
quick to generate), plus a second, unrelated CA with a sender certificate of
its own, to play an impostor.  The receiver's certificate names it as
``localhost``, ``receiver.test`` and ``127.0.0.1``; a second receiver
certificate carries only the DNS name ``receiver.test``, for the checks of
a receiver addressed by IP.

These are the commands docs/operations.md gives as the recipe for a CA and
its certificates.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    """Paths of the files ``make_pki`` wrote."""

    ca: str
    receiver_cert: str
    receiver_key: str
    sender_cert: str
    sender_key: str
    rogue_ca: str
    rogue_cert: str
    rogue_key: str
    dns_only_cert: str
    dns_only_key: str


def _openssl(*args: str, cwd: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=60)
    if result.returncode:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr}")


def _ca(directory: str, name: str) -> None:
    _openssl("req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


#: The receiver's names: senders connect to it by one of them.
SANS = "DNS:localhost,DNS:receiver.test,IP:127.0.0.1"


def _leaf(directory: str, ca: str, name: str, sans: str = SANS) -> None:
    _openssl("req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=directory)
    with open(os.path.join(directory, f"{name}.ext"), "w") as f:
        f.write(f"subjectAltName={sans}\n"
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=directory)


def make_pki(directory: str) -> Pki:
    """Write a CA, receiver and sender certificates and an impostor's into ``directory``."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates "
                    "(apt-get install openssl)")
    _ca(directory, "ca")
    _leaf(directory, "ca", "receiver")
    _leaf(directory, "ca", "sender")
    _ca(directory, "rogue-ca")
    _leaf(directory, "rogue-ca", "rogue")
    _leaf(directory, "ca", "dns-only", "DNS:receiver.test")

    def path(name: str) -> str:
        return os.path.join(directory, name)

    return Pki(
        ca=path("ca.pem"),
        receiver_cert=path("receiver.pem"), receiver_key=path("receiver.key"),
        sender_cert=path("sender.pem"), sender_key=path("sender.key"),
        rogue_ca=path("rogue-ca.pem"), rogue_cert=path("rogue.pem"), rogue_key=path("rogue.key"),
        dns_only_cert=path("dns-only.pem"), dns_only_key=path("dns-only.key"),
    )
