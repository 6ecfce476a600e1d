"""A private, throwaway PostgreSQL cluster for scenarios that must restart or break the server.

The machine's main cluster is shared by every test running at the same time (and by CI), so a
scenario that restarts PostgreSQL starts its own: ``initdb`` into a temporary directory, ``pg_ctl
start`` on a free port of 127.0.0.1 (its socket in the same directory), torn down at the end.

``initdb`` refuses to run as root: as root the cluster belongs to the ``postgres`` user and every
``initdb``/``pg_ctl`` runs through ``runuser -u postgres``; as anyone else it runs as that user.

When no cluster can be started, ``private_cluster_or_skip`` skips loudly (``warnings.warn`` +
``pytest.skip``), except under ``CI=true`` where it fails: CI's machine has the binaries and is
root with a ``postgres`` user, so a cluster that cannot start there (initdb or pg_ctl failing)
is a broken setup, not an absent feature. The exception, a loud skip under CI too, is a machine
where no initdb can run at all, neither as root nor as anyone else: no PostgreSQL server
binaries (the tests then use a server elsewhere, ``$CONVEYOR_TEST_POSTGRES_URL``), or root with
no ``postgres`` user or ``runuser`` to become it. Nothing can be restarted there.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: The server's role (trust authentication) and the database the scenarios use.
USER = "postgres"
DATABASE = "conveyor"


class ClusterUnavailable(Exception):
    """No private cluster can be started here; ``absent`` when no initdb can run at all (no
    server binaries; root with no ``postgres`` user or ``runuser`` to become it)."""

    def __init__(self, message: str, *, absent: bool = False) -> None:
        super().__init__(message)
        self.absent = absent


def find_bindir() -> Path | None:
    """The directory of ``initdb``/``pg_ctl``/``postgres``: $PATH, else the newest Debian
    ``/usr/lib/postgresql/N/bin``."""
    for name in ("initdb", "pg_ctl"):
        found = shutil.which(name)
        if found:
            real = Path(found).resolve().parent
            if (real / "initdb").exists() and (real / "pg_ctl").exists():
                return real
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for bindir in reversed(versions):
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A running private cluster: ``url`` reaches its ``conveyor`` database over TCP."""

    bindir: Path
    root: Path  # the temporary directory: data/, the socket and the server log
    port: int
    run_as: str | None  # "postgres" when we are root, else None (ourselves)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        return subprocess.run(
            [*prefix, *args],
            cwd=self.root,  # runuser keeps the cwd: somewhere the server's user may enter
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        done = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), *args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"pg_ctl {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}"
                f"\nserver log:\n{self.server_log()[-3000:]}"
            )

    def _options(self) -> str:
        return f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"

    def start(self) -> None:
        self._pg_ctl("-o", self._options(), "-l", str(self.log_path), "-w", "-t", "60", "start")

    def restart(self, mode: str) -> None:
        """``pg_ctl restart -m fast|immediate``; returns once the server accepts connections
        again (after crash recovery, for ``immediate``)."""
        self._pg_ctl(
            "-o", self._options(), "-l", str(self.log_path), "-m", mode, "-w", "-t", "60", "restart"
        )

    def stop(self, mode: str = "immediate") -> None:
        self._pg_ctl("-m", mode, "-w", "stop")

    def server_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _server_user() -> str | None:
    """Who runs the server: None (ourselves) unless we are root, then ``postgres``."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(USER)
    except KeyError:
        raise ClusterUnavailable(
            f"running as root (initdb refuses root) and there is no {USER!r} user", absent=True
        ) from None
    if shutil.which("runuser") is None:
        raise ClusterUnavailable(
            "running as root (initdb refuses root) and no runuser to become postgres", absent=True
        )
    return USER


def start_cluster() -> Cluster:
    """initdb + start a new cluster on a free port, with a ``conveyor`` database."""
    bindir = find_bindir()
    if bindir is None:
        raise ClusterUnavailable("no PostgreSQL server binaries (initdb, pg_ctl)", absent=True)
    run_as = _server_user()
    # As root the server's user must reach the directory: /tmp, not a private $TMPDIR.
    root = Path(tempfile.mkdtemp(prefix="conveyor-pgcluster-", dir="/tmp" if run_as else None))
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = Cluster(bindir, root, 0, run_as)
    try:
        done = cluster._run(
            str(bindir / "initdb"),
            "-D",
            str(cluster.data),
            "-U",
            USER,
            "-A",
            "trust",
            "--no-sync",
        )
        if done.returncode != 0:
            raise ClusterUnavailable(f"initdb failed ({done.returncode}): {done.stderr.strip()}")
        for attempt in range(3):  # a free port can be taken between our probe and the server
            cluster.port = free_port()
            try:
                cluster.start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        _create_database(cluster)
        return cluster
    except BaseException:
        cluster.destroy()
        raise


def _create_database(cluster: Cluster) -> None:
    import psycopg

    with psycopg.connect(cluster.url("postgres"), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"CREATE DATABASE {DATABASE}")


@contextlib.contextmanager
def private_cluster_or_skip() -> Iterator[Cluster]:
    """A fresh private cluster for the ``with`` block, destroyed afterwards; skip (or, under
    CI=true, fail) where none can be started (see the module's docstring)."""
    started = time.monotonic()
    try:
        cluster = start_cluster()
    except (ClusterUnavailable, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        message = f"cannot start a private PostgreSQL cluster: {exc}"
        absent = isinstance(exc, ClusterUnavailable) and exc.absent
        if os.environ.get("CI") == "true" and not absent:
            pytest.fail(f"{message} (CI=true requires it)")
        warnings.warn(f"SKIPPING: {message}", stacklevel=2)
        pytest.skip(message)
    print(f"private cluster on port {cluster.port} up in {time.monotonic() - started:.1f} s")
    try:
        yield cluster
    finally:
        print(f"---- private cluster server log (last lines)\n{cluster.server_log()[-3000:]}")
        cluster.destroy()
