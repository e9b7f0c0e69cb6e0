#!/usr/bin/env python3
"""Set up a virtual environment and run dsamig's demo or test suite.

    python3 dev.py demo      # build, install, run ``dsamig demo``
    python3 dev.py test      # build, install with test tools, run lint, types, tests

Needs only Python 3.11+, pip and a C compiler: everything else (Cython, uvloop,
pytest, ...) is installed into ``.venv`` from the package index, and the two
system tools some tests run (systemd-analyze, openssl) with apt-get when they
are missing and we may.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
BIN = os.path.join(VENV, "bin")


def run(*cmd: str, **kwargs: object) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


def setup(extras: str) -> None:
    if not os.path.exists(os.path.join(BIN, "python")):
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = (os.path.join(BIN, "python"), "-m", "pip")
    run(*pip, "install", "--quiet", "--upgrade", "pip")
    # Editable, so the tests import the tree they sit in, with the extension
    # built in place; the build requirements (Cython) come from pyproject.toml.
    run(*pip, "install", "--quiet", "-e", f".{extras}")


# Commands some tests run that pip cannot install, with their Debian package:
# systemd-analyze verifies the unit files (no PID 1 needed); openssl makes
# throwaway certificates for the TLS tests.
SYSTEM_TOOLS = (("systemd-analyze", "systemd"), ("openssl", "openssl"))


def system_tools() -> None:
    """Install the missing SYSTEM_TOOLS with apt-get where we may; else say so."""
    missing = [pkg for cmd, pkg in SYSTEM_TOOLS if shutil.which(cmd) is None]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else (["sudo"] if shutil.which("sudo") else None)
    if shutil.which("apt-get") is None or sudo is None:
        print(f"note: install {' '.join(missing)} for the tests that need them", flush=True)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(*sudo, "apt-get", "update", "-qq", env=env)
    run(*sudo, "apt-get", "install", "-y", "-qq", *missing, env=env, stdout=subprocess.DEVNULL)


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "demo":
        setup("")
        run(os.path.join(BIN, "dsamig"), "demo", *sys.argv[2:])
        return 0
    if what == "test":
        setup("[test]")
        py = os.path.join(BIN, "python")
        run(py, "-m", "ruff", "check", "dsamig", "tests", "benchmarks")
        run(py, "-m", "mypy")
        system_tools()
        run(py, "-m", "pytest", *sys.argv[2:])
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
