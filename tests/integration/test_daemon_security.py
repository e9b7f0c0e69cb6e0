"""Daemons with mutual TLS and a pre-shared key configured in YAML."""

from __future__ import annotations

import os

from tests.conftest import read_bytes
from tests.helpers_tls import make_pki
from tests.integration.daemon_helpers import Daemon, ok, short_dir

MiB = 1024 * 1024


def test_tls_and_psk_from_yaml(image_factory) -> None:
    image, zero, normal = image_factory(2 * MiB + 4096, seed=21)
    with short_dir() as directory:
        pki = make_pki(directory)
        psk = os.path.join(directory, "psk")
        with open(psk, "wb") as f:
            f.write(os.urandom(32))
        os.chmod(psk, 0o600)
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        receiver = Daemon.start("receiver", directory, {
            "listen": "127.0.0.1:0", "storage_dir": storage,
            "security": {"tls_cert": pki.receiver_cert, "tls_key": pki.receiver_key,
                         "tls_ca": pki.ca, "psk_file": psk},
        })
        sender = Daemon.start("sender", directory, {})
        try:
            good = ok(sender.socket, "job-start", {
                "name": "secure", "source": image,
                "destination": {"host": "127.0.0.1", "port": receiver.port},
                "security": {"tls_cert": pki.sender_cert, "tls_key": pki.sender_key,
                             "tls_ca": pki.ca, "psk_file": psk},
            })
            done = sender.wait_job(good["id"])
            assert done["status"] == "completed", done
            assert (done["duplicate"], done["normal"]) == (zero, normal)
            assert read_bytes(os.path.join(storage, "secure")) == read_bytes(image)

            # No client certificate: refused before any page data, nothing stored.
            bad = ok(sender.socket, "job-start", {
                "name": "impostor", "source": image, "retry_for": 0,
                "destination": {"host": "127.0.0.1", "port": receiver.port},
                "security": {"tls_ca": pki.ca, "psk_file": psk},
            })
            failed = sender.wait_job(bad["id"])
            assert failed["status"] == "failed"
            assert "TLS" in failed["error-desc"] or "certificate" in failed["error-desc"]
            assert not [n for n in os.listdir(storage) if n.startswith("impostor")]
        finally:
            sender.kill()
            receiver.kill()
