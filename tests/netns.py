"""Several "hosts" on one machine: Linux network namespaces on a bridge.

``Hosts(n)`` builds namespaces ``<tag>h1..<tag>hN`` (``tag``: random per test, so
parallel runs and leftovers never collide), each with one veth into a bridge
``<tag>br`` in the root namespace, addresses ``10.77.0.1 .. 10.77.0.N/24`` and its
own loopback up. The bridge has no address: the subnet exists only inside the
namespaces, so nothing of the machine's own network is touched.

    with Hosts(3) as hosts:               # or the ``hosts`` fixture factory
        p = hosts.popen(1, ["python", ...])   # runs inside host 1
        hosts.link_down(2)                     # host 2 drops off the network

Creating namespaces needs root and iproute2; :func:`unavailable` says why not,
and :func:`require` turns that into ``pytest.skip("network namespaces not
available here: <reason>")``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from typing import Optional

SUBNET = "10.77.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {out.stderr.strip() or out.returncode}")
    return out


def unavailable() -> Optional[str]:
    """Why namespaces cannot be built here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root (ip netns needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"t{secrets.token_hex(3)}probe"
    try:
        out = _ip("netns", "add", probe, check=False)
        if out.returncode != 0:
            return f"`ip netns add` failed: {out.stderr.strip() or out.returncode}"
        br = _ip("link", "add", f"{probe[:7]}pb", "type", "bridge", check=False)
        if br.returncode != 0:
            return f"`ip link add ... type bridge` failed: {br.stderr.strip() or br.returncode}"
        _ip("link", "del", f"{probe[:7]}pb", check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip` could not run: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def require() -> None:
    """Skip the calling test, saying why, when namespaces are not available."""
    import pytest
    reason = unavailable()
    if reason:
        pytest.skip(f"network namespaces not available here: {reason}")


class Hosts:
    def __init__(self, n: int):
        assert 1 <= n <= 200
        self.n = n
        self.tag = f"t{secrets.token_hex(3)}"  # interface names stay under 15 characters
        self.bridge = f"{self.tag}br"
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []

    def name(self, i: int) -> str:
        return f"{self.tag}h{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i}"

    def _veth(self, i: int) -> tuple[str, str]:
        return f"{self.tag}v{i}", f"{self.tag}p{i}"  # bridge side, host side

    def up(self) -> "Hosts":
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append("bridge")
            _ip("link", "set", self.bridge, "up")
            for i in range(1, self.n + 1):
                ns, (outer, inner) = self.name(i), self._veth(i)
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self

    def cmd(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` prefixed to run inside host ``i``."""
        return ["ip", "netns", "exec", self.name(i), *[str(a) for a in argv]]

    def popen(self, i: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside host ``i`` in its own process group (killed by :meth:`down`)."""
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.cmd(i, argv), **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, i: int, argv: list[str], timeout_s: float = 30, **kwargs):
        return subprocess.run(self.cmd(i, argv), capture_output=True, text=True,
                              timeout=timeout_s, **kwargs)

    def link_down(self, i: int) -> None:
        """Host ``i`` drops off the network: its cable is pulled (no RST, no FIN)."""
        _ip("link", "set", self._veth(i)[0], "down")

    def link_up(self, i: int) -> None:
        _ip("link", "set", self._veth(i)[0], "up")

    def down(self) -> None:
        """End what was started inside (TERM, then KILL), delete namespaces (their veths go too) and bridge."""
        for sig in (signal.SIGTERM, signal.SIGKILL):  # a launcher ends its children on TERM
            for proc in self.procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        pass
            for proc in self.procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for i in range(1, self.n + 1):
            if self.name(i) in self._made:
                _ip("netns", "del", self.name(i), check=False)
                _ip("link", "del", self._veth(i)[0], check=False)
        if "bridge" in self._made:
            _ip("link", "del", self.bridge, check=False)
        self._made.clear()

    def __enter__(self) -> "Hosts":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
