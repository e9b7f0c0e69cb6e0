#!/usr/bin/env python3
"""Set up a virtual environment and run dsamig's demo or test suite.

    python3 dev.py demo      # build, install, run ``dsamig demo``
    python3 dev.py test      # build, install with test tools, run lint, types, tests,
                             # the data path's tests again on the pure-Python twin,
                             # then the package check below
    python3 dev.py package   # build the sdist, install it into a fresh venv (a wheel
                             # is built from it) and run ``dsamig demo`` from there

Needs only Python 3.11+, pip and a C compiler: everything else (Cython, uvloop,
pytest, ...) is installed into ``.venv`` from the package index, and the
system tools some tests run (systemd-analyze, openssl, qemu-system-x86_64)
with apt-get when they are missing and we may.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
BIN = os.path.join(VENV, "bin")


def run(*cmd: str, **kwargs: object) -> None:
    print("+", " ".join(cmd), flush=True)
    kwargs.setdefault("cwd", ROOT)
    subprocess.run(cmd, check=True, **kwargs)  # type: ignore[call-overload]


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
# throwaway certificates for the TLS tests; QEMU (TCG, no KVM needed) runs the
# guest of the live-migration tests.
SYSTEM_TOOLS = (("systemd-analyze", "systemd"), ("openssl", "openssl"),
                ("qemu-system-x86_64", "qemu-system-x86"))


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
    # Without recommends: qemu-system-x86 alone would pull in some 170 packages.
    run(*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, env=env,
        stdout=subprocess.DEVNULL)


# Sources the sdist must carry: everything under these directories with these
# endings, less what a build generates.
SOURCE_DIRS = ("dsamig", "cython")
SOURCE_ENDINGS = (".py", ".pyi", ".pyx", ".pxd", ".c", ".h", "py.typed")
GENERATED = ("cython/_native.c",)


def check_sdist(sdist: str) -> None:
    """Fail unless ``sdist`` holds every source file of the tree."""
    with tarfile.open(sdist) as tar:
        inside = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = []
    for top in SOURCE_DIRS:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                path = os.path.relpath(os.path.join(folder, name), ROOT)
                if name.endswith(SOURCE_ENDINGS) and path not in GENERATED and path not in inside:
                    missing.append(path)
    if missing:
        sys.exit(f"the sdist {os.path.basename(sdist)} lacks: {', '.join(sorted(missing))} "
                 "(see MANIFEST.in)")


def package() -> None:
    """Build the sdist, install it into a fresh venv (pip builds the wheel from
    it) and run the demo from outside the tree: what a user's install does."""
    py = os.path.join(BIN, "python")
    with tempfile.TemporaryDirectory(prefix="dsamig-package-") as tmp:
        dist = os.path.join(tmp, "dist")
        run(py, "-m", "build", "--sdist", "--outdir", dist, ".", stdout=subprocess.DEVNULL)
        (sdist,) = glob.glob(os.path.join(dist, "*.tar.gz"))
        check_sdist(sdist)
        env = os.path.join(tmp, "venv")
        venv.EnvBuilder(with_pip=True).create(env)
        env_py = os.path.join(env, "bin", "python")
        clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DSAMIG_SOCKET")}
        # From the sdist alone: a file it lacks fails the wheel build here.
        run(env_py, "-m", "pip", "install", "--quiet", sdist, cwd=tmp, env=clean)
        # The extension must be the one built from the sdist, not the tree's.
        run(env_py, "-c", "import dsamig._native, sys; "
            "assert dsamig._native.__file__.startswith(sys.prefix), dsamig._native.__file__",
            cwd=tmp, env=clean)
        run(os.path.join(env, "bin", "dsamig"), "demo", "--size", "64MiB", cwd=tmp, env=clean)


# What runs a second time on the pure-Python twin (DSAMIG_NO_EXTENSIONS=1):
# the protocol and unit tests whole, and of tests/integration the transfers
# that move bytes through the twin's packet_payload, write_runs and CRC32C
# (in process and through the CLI) and verify's digest.  The other
# integration tests (daemons, control socket, TLS) take the same data path
# and would add minutes of pure-Python page handling for no new coverage.
TWIN_TESTS = (
    "tests/protocol",
    "tests/unit",
    "tests/integration/test_transfer.py",
    "tests/integration/test_verify.py",
    "tests/integration/test_cli.py::test_send_receive_json",
)
# The big images of those (9 and 64 MiB) take the twin half a minute each and
# prove nothing the small ones do not: the native run has them.
TWIN_SKIP = "not test_destination_is_sparse and not 9437191"
# The receiver fuzz target drives the job cores, the same Python on both
# runs; on the twin it only takes three quarters of a minute longer.
TWIN_IGNORE = "tests/protocol/test_receiver_fuzz.py"


def twin_tests(py: str) -> None:
    """Run TWIN_TESTS with the native extension disabled."""
    env = {**os.environ, "DSAMIG_NO_EXTENSIONS": "1"}
    run(py, "-m", "pytest", "-q", "-k", TWIN_SKIP, f"--ignore={TWIN_IGNORE}", *TWIN_TESTS,
        env=env)


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
        twin_tests(py)
        package()
        return 0
    if what == "package":
        setup("[test]")
        package()
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
