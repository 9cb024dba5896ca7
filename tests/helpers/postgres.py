"""A real, throw-away PostgreSQL server for tests: its own cluster in a temporary directory, on a free loopback
port, started with the server binaries (`initdb`, `pg_ctl`) of a Debian/Ubuntu `postgresql` package.

PostgreSQL refuses to run as root. When the tests run as root (CI here does), the cluster belongs to the
`postgres` system user (or `nobody`) and every command runs through `runuser`; its directory lives under
/tmp, since pytest's own temporary directories are private to root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.server import free_port
from tests.helpers.tools import missing_tool

USER = "batch"


def _binaries() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def why_not() -> str | None:
    """Why no PostgreSQL server can be started here, or None if one can."""
    if _binaries() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return 'psycopg is not installed: pip install "vllm-batch[postgres]"'
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _owner() is None):
        return "running as root without runuser or a postgres/nobody user to run PostgreSQL as"
    return None


def _owner() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


@dataclass
class Postgres:
    directory: Path
    port: int
    bin: Path
    owner: pwd.struct_passwd

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres connect_timeout=5"

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin / command[0]), *command[1:]]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", self.owner.pw_name, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    def _checked(self, *command: str) -> None:
        result = self._run(*command)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
                               f"\n{self.log()}")

    def init(self) -> Postgres:
        self._checked("initdb", "-D", str(self.directory / "data"), "-A", "trust", "-U", USER, "--no-sync")
        return self

    def start(self) -> Postgres:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._checked("pg_ctl", "-D", str(self.directory / "data"), "-o", options, "-l",
                      str(self.directory / "log"), "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-m", mode, "-w", "stop")

    def log(self) -> str:
        try:
            return (self.directory / "log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


def make_postgres() -> Postgres:
    """Create (initdb) a cluster, not started. Call why_not() first."""
    owner = _owner()
    binaries = _binaries()
    assert owner is not None and binaries is not None
    directory = Path(tempfile.mkdtemp(prefix="vllm-batch-pg-", dir="/tmp"))
    os.chmod(directory, 0o700)
    os.chown(directory, owner.pw_uid, owner.pw_gid)
    return Postgres(directory, free_port(), binaries, owner).init()


@contextlib.contextmanager
def running() -> Iterator[Postgres]:
    """A started cluster for a test or a module, removed afterwards; where none can start, the test skips (a
    developer's machine) or fails (CI) saying what to install."""
    if (reason := why_not()) is not None:
        missing_tool(reason)
    server = make_postgres().start()
    try:
        yield server
    finally:
        server.remove()
