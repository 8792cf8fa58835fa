"""A network namespace with test-host addresses (198.18.0.0/15) joined to this host by a veth.

`TestNetwork.create(work_dir, guest_addresses=2)`:

- starts a holder process `unshare --net -- cat` (stdin is a pipe, so the holder,
  and with it the namespace, also goes away when the test process dies);
- creates a veth pair: `cbt<hex>` on this host, `eth0` inside the namespace;
- picks a free /29 in 198.18.0.0/15: the host end gets `.1`, the namespace `.2`,
  `.3`, …; IPv6 is disabled on both ends (no link-local addresses appear);
- runs servers inside with `nsenter --net=/proc/<holder>/ns/net` (the path of the
  holder, never a name under /run/netns: nothing is mounted anywhere).

`close()` deletes the host end (which deletes its peer) and ends the holder by pid;
the namespace disappears with its last process. Nothing else on the host changes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.support.docker_processes import (
    ManagedProcess,
    TestbedError,
    clean_environment,
    require_binary,
    run_checked,
    wait_until,
)

TEST_NET = ipaddress.IPv4Network("198.18.0.0/15")
PREFIX = 29
_ATTEMPTS = 20


class TestNetwork:
    """One network namespace and the veth pair that reaches it from this host."""

    __test__ = False

    def __init__(self, work_dir: Path, guest_addresses: int = 2) -> None:
        if not 1 <= guest_addresses <= 5:
            raise ValueError("a /29 holds the host end and at most 5 guest addresses")
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._guest_count = guest_addresses
        self.host_interface = f"cbt{secrets.token_hex(5)}"
        self.subnet: ipaddress.IPv4Network | None = None
        self._holder: ManagedProcess | None = None
        self._link_created = False
        self._ip = require_binary("ip", "iproute2")
        self._nsenter = require_binary("nsenter", "util-linux")

    @classmethod
    def create(cls, work_dir: Path, guest_addresses: int = 2) -> TestNetwork:
        network = cls(work_dir, guest_addresses)
        try:
            network._setup()
        except BaseException:
            network.close()
            raise
        return network

    # -- addresses -------------------------------------------------------------------

    @property
    def host_address(self) -> str:
        """This host's end of the veth (the source address the namespace sees)."""
        return str(self._subnet[1])

    @property
    def guest_addresses(self) -> list[str]:
        """The namespace's addresses on `eth0`, in order."""
        return [str(self._subnet[2 + i]) for i in range(self._guest_count)]

    @property
    def _subnet(self) -> ipaddress.IPv4Network:
        if self.subnet is None:
            raise TestbedError("the test network is not set up")
        return self.subnet

    @property
    def namespace_path(self) -> str:
        if self._holder is None:
            raise TestbedError("the test network is not set up")
        return f"/proc/{self._holder.pid}/ns/net"

    # -- setup -----------------------------------------------------------------------

    def _setup(self) -> None:
        unshare = require_binary("unshare", "util-linux")
        cat = require_binary("cat", "coreutils")
        holder = ManagedProcess(
            "netns holder",
            [unshare, "--net", "--", cat],
            self.work_dir / "netns-holder.log",
            stdin=subprocess.PIPE,
        )
        self._holder = holder.start()
        own = Path("/proc/self/ns/net").readlink()
        wait_until(
            lambda: True if Path(self.namespace_path).readlink() != own else None,
            timeout=5.0,
            what="unshare --net (creating a network namespace)",
            alive=holder.death,
        )
        self.subnet = self._pick_subnet()
        run_checked(
            [
                self._ip,
                "link",
                "add",
                self.host_interface,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                str(holder.pid),
            ],
            "creating the veth pair",
        )
        self._link_created = True
        self._disable_ipv6(self.host_interface, inside=False)
        self._disable_ipv6("eth0", inside=True)
        run_checked(
            [
                self._ip,
                "address",
                "add",
                f"{self.host_address}/{PREFIX}",
                "dev",
                self.host_interface,
            ],
            "addressing the host end of the veth",
        )
        run_checked([self._ip, "link", "set", self.host_interface, "up"], "bringing the veth up")
        for address in self.guest_addresses:
            self.run_inside(
                [self._ip, "address", "add", f"{address}/{PREFIX}", "dev", "eth0"],
                "addressing the namespace end of the veth",
            )
        self.run_inside([self._ip, "link", "set", "lo", "up"], "bringing lo up")
        self.run_inside([self._ip, "link", "set", "eth0", "up"], "bringing eth0 up")

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        """A random /29 of 198.18.0.0/15 that no route or address here overlaps."""
        used = self._used_networks()
        subnets = 2 ** (PREFIX - TEST_NET.prefixlen)
        for _ in range(_ATTEMPTS):
            index = secrets.randbelow(subnets)
            candidate = ipaddress.IPv4Network(
                (int(TEST_NET.network_address) + index * 2 ** (32 - PREFIX), PREFIX)
            )
            if not any(candidate.overlaps(network) for network in used):
                return candidate
        raise TestbedError(f"no free /{PREFIX} in {TEST_NET} after {_ATTEMPTS} attempts")

    def _used_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        routes = json.loads(
            run_checked([self._ip, "-j", "-4", "route", "show", "table", "all"], "listing routes")
            or "[]"
        )
        networks = []
        for route in routes:
            destination = route.get("dst", "")
            if destination in ("", "default"):
                continue
            with contextlib.suppress(ValueError):
                networks.append(ipaddress.ip_network(destination, strict=False))
        return networks

    def _disable_ipv6(self, interface: str, *, inside: bool) -> None:
        setting = f"net.ipv6.conf.{interface}.disable_ipv6=1"
        sysctl = require_binary("sysctl", "procps")
        if not Path("/proc/sys/net/ipv6").exists():
            return
        if inside:
            self.run_inside([sysctl, "-q", "-w", setting], "disabling IPv6 in the namespace")
        else:
            run_checked([sysctl, "-q", "-w", setting], "disabling IPv6 on the veth")

    # -- use -------------------------------------------------------------------------

    def command_inside(self, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed so that it runs in the namespace (nsenter execs: same pid)."""
        return [self._nsenter, f"--net={self.namespace_path}", "--", *argv]

    def run_inside(self, argv: Sequence[str], what: str) -> str:
        return run_checked(self.command_inside(argv), what)

    def start_inside(self, name: str, argv: Sequence[str], log_path: Path) -> ManagedProcess:
        return ManagedProcess(
            name, self.command_inside(argv), log_path, env=clean_environment()
        ).start()

    def create_connection(self, address: tuple[str, int], timeout: float) -> socket.socket:
        """A TCP connection to a guest: this host reaches them through the veth."""
        return socket.create_connection(address, timeout)

    def close(self) -> None:
        """Delete the veth (its peer goes with it) and end the holder. Idempotent."""
        if self._link_created:
            with contextlib.suppress(TestbedError, subprocess.TimeoutExpired):
                run_checked([self._ip, "link", "delete", self.host_interface], "deleting the veth")
            self._link_created = False
        if self._holder is not None:
            self._holder.stop()
            self._holder = None

    def __enter__(self) -> TestNetwork:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
