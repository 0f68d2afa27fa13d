"""Each emulated node is a VM of its own: namespaces on this machine, and a private network.

What it guarantees:

* ``probe()`` says whether nodes can be VMs here: root, ``unshare`` and ``ip``, and a bridge
  that can be made and removed. If not, it gives one line saying why, and rehearse falls
  back to processes on this machine's network and filesystem (see ``FALLBACK``).
* ``Network`` owns one Linux bridge, ``sks<hex pid>``, on a /24 in 10.213.0.0/16 that no
  address here uses. It is the only network device rehearse creates, apart from one veth
  pair per node start, and the veth goes away with the node's namespace. ``close()`` removes
  the bridge. Bridges of earlier rehearsals whose process is gone are removed when a new
  ``Network`` starts. Nothing listens on any address but the bridge's gateway.
* ``Network.attach(pid, names)`` moves a fresh veth end into the network namespace of
  ``pid`` once that process has one of its own. node_init.py then names it ``eth0`` and
  gives it ``address(index)``.
* ``vm_config`` builds node_init.py's ``vm`` section: hostname, address, the root it builds,
  and every path the node sees at its literal place: the recipe's ``file_mounts`` targets,
  its own ``/etc/hosts``, and the recipe's workdir at ``~/sky_workdir``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import psutil

BRIDGE = re.compile(r"^sks([0-9a-f]+)$")
SUBNETS = ipaddress.ip_network("10.213.0.0/16")
MAX_NODES = 250  # addresses .2 to .251 of the bridge's /24
NS_WAIT_S = 10.0
UNSHARE = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--net",
           "--uts"]
FALLBACK = ("nodes are processes on this machine: they share its network (every node's "
            "address is 127.0.0.1) and filesystem, mount paths are rewritten only in envs, "
            "and a recipe that writes a mount path literally is refused")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def probe() -> tuple[bool, str]:
    """(nodes can be VMs here, why not)."""
    if os.geteuid() != 0:
        return False, "not root (network and mount namespaces need it)"
    for tool in ("unshare", "ip", "mount"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found"
    try:
        result = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return False, f"unshare failed: {err}"
    if result.returncode != 0:
        return False, f"unshare failed: {result.stderr.strip() or result.returncode}"
    return True, ""


class Network:
    """A private bridge for one rehearsal: the nodes' addresses and the gateway they reach."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid():x}"
        self.bridge = f"sks{self.tag}"
        self.subnet: ipaddress.IPv4Network | None = None
        self._veths = 0

    def start(self) -> Network:
        _remove_stale_bridges()
        candidates = [net for net in SUBNETS.subnets(new_prefix=24)
                      if net.network_address.packed[2] != 0]
        first = os.getpid() % len(candidates)  # concurrent rehearsals start apart
        for net in candidates[first:] + candidates[:first]:
            if any(net.overlaps(used) for _, used in _subnets()):
                continue
            self.subnet = net
            # A fixed (locally administered) MAC: a bridge without one takes the lowest MAC
            # of its ports, so a VM that joins with a lower one changed the gateway's MAC
            # under the running VMs, whose connections to the bucket and the metadata
            # endpoint then hung until their ARP entries expired (~60 s, seen in pools).
            mac = "02:73:6b:" + ":".join(f"{b:02x}" for b in os.getpid().to_bytes(4, "big")[1:])
            _ip("link", "add", self.bridge, "address", mac, "type", "bridge",
                "forward_delay", "0")
            try:
                _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
                # Another rehearsal may have taken the same /24 meanwhile: two bridges with
                # one subnet would route a node's packets to the other's. Then try the next.
                if any(net.overlaps(used) for name, used in _subnets() if name != self.bridge):
                    _ip("link", "del", self.bridge, check=False)
                    continue
                _ip("link", "set", self.bridge, "up")
            except OSError:
                self.close()
                raise
            return self
        raise OSError(f"no free /24 in {SUBNETS} for the nodes' bridge")

    @property
    def gateway(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def address(self, index: int) -> str:
        """The address of VM ``index`` (0-based over every node of every job)."""
        assert self.subnet is not None
        if not 0 <= index < MAX_NODES:
            raise ValueError(f"at most {MAX_NODES} nodes per rehearsal, not {index + 1}")
        return str(self.subnet.network_address + 2 + index)

    def reserve(self) -> tuple[str, str]:
        """Names for a new veth pair: (the bridge's end, the node's end until it is eth0)."""
        self._veths += 1
        return f"skv{self.tag}-{self._veths}", f"skp{self.tag}-{self._veths}"

    def attach(self, pid: int, names: tuple[str, str]) -> None:
        """Make the veth pair ``names`` and move its node end into pid's network namespace."""
        deadline = time.monotonic() + NS_WAIT_S
        ours = os.readlink("/proc/self/ns/net")
        while True:  # unshare(2) runs in the child right after exec; wait until it has
            try:
                if os.readlink(f"/proc/{pid}/ns/net") != ours:
                    break
            except OSError:
                raise OSError(f"node process {pid} exited before its network was up") from None
            if time.monotonic() > deadline:
                raise OSError(f"node process {pid} has no network namespace after {NS_WAIT_S} s")
            time.sleep(0.005)
        host, peer = names
        _ip("link", "add", host, "type", "veth", "peer", "name", peer)
        try:
            _ip("link", "set", host, "master", self.bridge)
            _ip("link", "set", host, "up")
            _ip("link", "set", peer, "netns", str(pid))
        except OSError:
            _ip("link", "del", host, check=False)
            raise

    def close(self) -> None:
        _ip("link", "del", self.bridge, check=False)
        for name in _links():  # veths whose node namespace is somehow still alive
            if name.startswith(f"skv{self.tag}-"):
                _ip("link", "del", name, check=False)


def _subnets() -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, network) of every IPv4 address here."""
    found = []
    for line in _ip("-o", "-4", "addr").stdout.splitlines():
        words = line.split()
        for word in words[3:]:
            if "/" in word and word[0].isdigit():
                found.append((words[1], ipaddress.ip_interface(word).network))
    return found


def _links() -> list[str]:
    names = []
    for line in _ip("-o", "link", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return names


def _remove_stale_bridges() -> None:
    """Bridges left by a rehearsal that was killed: its process is gone."""
    for name in _links():
        match = BRIDGE.match(name)
        if match and not psutil.pid_exists(int(match[1], 16)):
            _ip("link", "del", name, check=False)
            for other in _links():
                if other.startswith(f"skv{match[1]}-"):
                    _ip("link", "del", other, check=False)


def hosts_file(path: Path, hostname: str, address: str, peers: dict[str, str]) -> Path:
    """The node's /etc/hosts: its hostname resolves to its own address, as on a VM."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
             f"{address} {hostname}"]
    lines += [f"{ip} {name}" for name, ip in peers.items() if name != hostname]
    path.write_text("\n".join(lines) + "\n")
    return path


def resolv_file(path: Path) -> Path:
    """The node's /etc/resolv.conf. Nodes reach nothing beyond the bridge, so a lookup that
    misses /etc/hosts fails at once (loopback refuses) instead of waiting on this machine's
    nameserver, which the node cannot reach, for ~10 s."""
    path.write_text("# skyspot rehearse: this node has no DNS (nothing beyond the bridge)\n"
                    "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    return path


def vm_config(*, hostname: str, iface: str, address: str, gateway: str, root: Path,
              binds: list[tuple[str, Path]]) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    return {"hostname": hostname, "iface": iface, "address": f"{address}/24",
            "gateway": gateway, "root": str(root),
            "binds": [[target, str(source)] for target, source in binds]}
