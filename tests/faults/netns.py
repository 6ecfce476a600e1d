"""Separate network "hosts" on one machine: network namespaces linked to the root namespace by
veth pairs, and a TCP forwarder per link so that their processes reach PostgreSQL over a network
the test can cut.

PostgreSQL listens on 127.0.0.1 only, which a namespace cannot reach; it could still reach the
server through its unix socket (namespaces share the file system), so a host's processes are only
ever given URLs naming the root-side address of one of their links, where a ``Forwarder`` (a
thread of the test process) relays to the real server. Cutting a link (``ip link set down`` on
its root side) is a silent partition: packets are dropped, connections hang, nobody is told.

Names are unique per test run (they carry the test process's pid), and ``Network.close`` removes
everything; a run that died without cleaning up is swept by the next one.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

#: How a link can be cut: its root side set down (the host's side loses its carrier: its TCP
#: retries every half second), the forwarder resetting every connection (the host learns at
#: once), or every packet silently dropped on the wire (its TCP backs off exponentially).
CUTS = ("link down", "connections reset", "packets dropped")
_NOWHERE = "02:00:00:00:00:00"  # a locally administered MAC address no interface has
PREFIX = "cvh3"  # namespaces are named cvh3-<pid of the test process>-<n>
#: The two address blocks, one per kind of link: 10.231.X.0/24 for data, 10.232.X.0/24 for logs.
BLOCKS = {"data": 231, "log": 232}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why this machine cannot make network namespaces (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip() or made.returncode}"
    try:
        inside = subprocess.run(
            ["ip", "netns", "exec", probe, sys.executable, "-c", "pass"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if inside.returncode != 0:
            return f"cannot run a process in a network namespace: {inside.stderr.strip()}"
        veth = f"cvp{os.getpid() % 100_000}"
        link = _ip("link", "add", veth, "type", "veth", "peer", "name", veth + "x", check=False)
        if link.returncode != 0:
            return f"cannot create a veth pair: {link.stderr.strip() or link.returncode}"
        _ip("link", "del", veth, check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def sweep_leftovers() -> None:
    """Delete the namespaces of earlier runs whose test process is gone."""
    names = _ip("netns", "list", check=False).stdout.split()
    for name in names:
        match = re.fullmatch(rf"{PREFIX}-(\d+)-\w+", name)
        if match and not _alive(int(match.group(1))):
            _ip("netns", "del", name, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _used_octets() -> set[int]:
    text = _ip("-o", "-4", "addr", "show", check=False).stdout
    used = set()
    for block in BLOCKS.values():
        used |= {int(m) for m in re.findall(rf"\b10\.{block}\.(\d+)\.", text)}
    return used


class Forwarder:
    """Relay TCP connections accepted on ``listen`` (host, port 0: any) to ``target``.

    ``drop(True)`` resets every relayed connection and every new one until ``drop(False)``."""

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server((listen_host, 0))
        self.server.settimeout(0.2)
        self.port: int = self.server.getsockname()[1]
        self.accepted = 0
        self._dropping = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="forwarder", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self._dropping:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with self._lock:
                    self._open.discard(sock)
                _reset(sock)

    def drop(self, on: bool) -> None:
        self._dropping = on
        if on:
            with self._lock:
                doomed, self._open = list(self._open), set()
            for sock in doomed:
                _reset(sock)

    def close(self) -> None:
        self._closed.set()
        self.drop(True)
        with contextlib.suppress(OSError):
            self.server.close()
        self._thread.join(5)


def _reset(sock: socket.socket) -> None:
    """End a connection at once: shut down (which also wakes a thread blocked reading it), then
    close without lingering."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class Link:
    """One veth pair: ``root_if`` (address ``root_addr``) in the root namespace, its peer
    (``ns_addr``) in the host's namespace, and the forwarder bound to ``root_addr``."""

    root_if: str
    root_addr: str
    ns_addr: str
    forwarder: Forwarder


@dataclass
class Host:
    name: str  # the network namespace
    links: dict[str, Link] = field(default_factory=dict)

    @property
    def prefix(self) -> tuple[str, ...]:
        """Run a command in this host: ``(*host.prefix, cmd, ...)``."""
        return ("ip", "netns", "exec", self.name)

    def url(self, base_url: str, link: str = "data") -> str:
        """``base_url`` (its user, database and options kept) reached through ``link``."""
        parts = urlsplit(base_url)
        user = parts.netloc.rpartition("@")[0]
        fwd = self.links[link]
        netloc = f"{user + '@' if user else ''}{fwd.root_addr}:{fwd.forwarder.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def cut(self, link: str, how: str) -> None:
        """Cut ``link``: ``how`` is one of CUTS."""
        fwd = self.links[link]
        if how == "link down":
            _ip("link", "set", fwd.root_if, "down")
        elif how == "connections reset":
            fwd.forwarder.drop(True)
        elif how == "packets dropped":
            # Each side sends its frames to a MAC address nobody has: they leave, and are
            # dropped by the receiving end, as behind a dead switch. Unlike a link going down,
            # the sender's TCP sees its segments go out, so it backs off as it would in a real
            # partition further away.
            ns_if = fwd.root_if + "x"
            _ip(
                *f"neigh replace {fwd.ns_addr} lladdr {_NOWHERE} nud permanent".split(),
                "dev",
                fwd.root_if,
            )
            _ip(
                *f"-n {self.name} neigh replace {fwd.root_addr} lladdr {_NOWHERE}".split(),
                *f"nud permanent dev {ns_if}".split(),
            )
        else:
            raise ValueError(f"unknown cut {how!r}: one of {CUTS}")

    def heal(self, link: str, how: str) -> None:
        fwd = self.links[link]
        if how == "link down":
            _ip("link", "set", fwd.root_if, "up")
        elif how == "connections reset":
            fwd.forwarder.drop(False)
        elif how == "packets dropped":
            _ip(*f"neigh del {fwd.ns_addr} dev {fwd.root_if}".split(), check=False)
            _ip(
                *f"-n {self.name} neigh del {fwd.root_addr} dev {fwd.root_if}x".split(), check=False
            )
        else:
            raise ValueError(f"unknown cut {how!r}: one of {CUTS}")


class Network:
    """Hosts made for one test; ``close()`` (also on failure) removes them all."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.hosts: list[Host] = []
        self._tag = f"{os.getpid() % 100_000}{random.randrange(36**2):02x}"[-6:]
        sweep_leftovers()

    def add_host(self) -> Host:
        n = len(self.hosts) + 1
        host = Host(f"{PREFIX}-{os.getpid()}-{self._tag}{n}")
        _ip("netns", "add", host.name)
        self.hosts.append(host)  # from here on close() removes it
        _ip("-n", host.name, "link", "set", "lo", "up")
        free = sorted(set(range(1, 255)) - _used_octets())
        octet = random.choice(free)
        for kind, block in BLOCKS.items():
            root_if = f"cv{self._tag}{n}{kind[0]}"  # at most 15 characters
            ns_if = root_if + "x"
            root_addr, ns_addr = f"10.{block}.{octet}.1", f"10.{block}.{octet}.2"
            _ip("link", "add", root_if, "type", "veth", "peer", "name", ns_if)
            _ip("link", "set", ns_if, "netns", host.name)
            _ip("addr", "add", f"{root_addr}/24", "dev", root_if)
            _ip("link", "set", root_if, "up")
            _ip("-n", host.name, "addr", "add", f"{ns_addr}/24", "dev", ns_if)
            _ip("-n", host.name, "link", "set", ns_if, "up")
            host.links[kind] = Link(root_if, root_addr, ns_addr, Forwarder(root_addr, self.target))
        return host

    def close(self) -> None:
        for host in self.hosts:
            for link in host.links.values():
                link.forwarder.close()
                _ip("link", "del", link.root_if, check=False)  # its peer goes with it
            _ip("netns", "del", host.name, check=False)
        self.hosts = []

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
