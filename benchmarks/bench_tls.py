"""TLS benchmark: the same transfer with and without TLS, and the ratio.

Run by hand (not a test):

    .venv/bin/pip install numpy
    .venv/bin/python benchmarks/bench_tls.py --runs 3

Both runs move the same image through the command line over loopback, plain
and with mutual TLS (throwaway certificates made with ``openssl``; TLS 1.3,
so AES-GCM or ChaCha20 as OpenSSL negotiates).  Plain and TLS runs alternate
so that a noisy neighbour hurts both alike; the medians and their ratio are
printed, with the per-run figures beside them.  ``--psk`` adds a run with the
pre-shared key alone (its cost is one handshake per channel, not per byte).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from images import make_image  # noqa: E402

from tests.helpers_tls import make_pki  # noqa: E402

MiB = 1 << 20


def transfer(image: str, dest: str, channels: int, receiver_args: list[str],
             sender_args: list[str]) -> dict[str, Any]:
    """One transfer through the CLI; the sender's and receiver's JSON stats."""
    dsamig = [sys.executable, "-m", "dsamig"]
    receiver = subprocess.Popen(
        [*dsamig, "receive", "--listen", "127.0.0.1:0", "--output", dest, "--once", "--json",
         *receiver_args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert receiver.stderr is not None
    port = int(receiver.stderr.readline().rsplit(":", 1)[1])
    sent = subprocess.run(
        [*dsamig, "send", image, "--to", f"127.0.0.1:{port}", "--channels", str(channels),
         "--json", *sender_args], capture_output=True, text=True, timeout=900,
    )
    out, err = receiver.communicate(timeout=900)
    if sent.returncode or receiver.returncode:
        raise SystemExit(f"transfer failed: {sent.stderr} {err}")
    os.unlink(dest)
    return {"sender": json.loads(sent.stdout.splitlines()[-1]),
            "receiver": json.loads(out.splitlines()[-1])}


def figures(stats: dict[str, Any]) -> dict[str, float]:
    sender, receiver = stats["sender"], stats["receiver"]
    seconds = sender["total-time"] / 1000
    return {
        "seconds": seconds,
        "image-MiB/s": sender["total"] / MiB / seconds,
        "sender-cpu-s": sender["cpu-s"],
        "receiver-cpu-s": receiver["cpu-s"],
    }


def report(name: str, rows: list[dict[str, float]]) -> dict[str, float]:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"\n== {name} (median of {len(rows)})")
    for key, value in med.items():
        print(f"  {key:<16} {value:10.3f}   runs: {', '.join(f'{r[key]:.3f}' for r in rows)}")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image MiB (default 1024)")
    parser.add_argument("--zero-fraction", type=float, default=0.25)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/dev/shm", help="where the image and copies live")
    parser.add_argument("--psk", action="store_true", help="also time the pre-shared key alone")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="dsamig-tls-", dir=args.dir)
    image, dest = os.path.join(work, "image.img"), os.path.join(work, "dest.img")
    make_image(image, args.size * MiB, args.zero_fraction)
    pki = make_pki(tempfile.mkdtemp(prefix="dsamig-pki-"))
    key = os.path.join(work, "psk")
    with open(key, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(key, 0o600)
    modes = {
        "plain": ([], []),
        "tls": (["--tls-cert", pki.receiver_cert, "--tls-key", pki.receiver_key,
                 "--tls-ca", pki.ca],
                ["--tls-cert", pki.sender_cert, "--tls-key", pki.sender_key, "--tls-ca", pki.ca]),
    }
    if args.psk:
        modes["psk"] = (["--psk-file", key], ["--psk-file", key])
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    try:
        transfer(image, dest, args.channels, [], [])  # warm the page cache and the allocator
        for _ in range(args.runs):
            for mode, (receiver_args, sender_args) in modes.items():
                rows[mode].append(figures(transfer(image, dest, args.channels, receiver_args,
                                                   sender_args)))
    finally:
        for path in (image, dest, key):
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(work)
    medians = {mode: report(mode, r) for mode, r in rows.items()}
    plain, tls = medians["plain"], medians["tls"]
    print(f"\nimage {args.size} MiB, {args.zero_fraction:.0%} zero pages, "
          f"{args.channels} channels")
    print(f"TLS throughput: {tls['image-MiB/s'] / plain['image-MiB/s']:.2f} x plain "
          f"({tls['image-MiB/s']:.0f} vs {plain['image-MiB/s']:.0f} MiB/s)")
    print(f"TLS CPU: sender {tls['sender-cpu-s'] / plain['sender-cpu-s']:.2f} x, "
          f"receiver {tls['receiver-cpu-s'] / plain['receiver-cpu-s']:.2f} x plain")
    if "psk" in medians:
        print(f"PSK throughput: {medians['psk']['image-MiB/s'] / plain['image-MiB/s']:.2f} x plain")


if __name__ == "__main__":
    main()
