"""The init of one emulated node: PID 1 of its namespaces, then a reaper.

    python node_init.py CONFIG.json

Run by tools/rehearsal/nodes.py, inside ``unshare`` (or as a plain child where namespaces are
unavailable). Standard library only: it runs before anything of the recipe. CONFIG holds:

    script   the file with run: or setup:, run as SkyPilot runs it: ``/bin/bash -i FILE``
             (so ~/.bashrc is sourced), from ``cwd``
    cwd      the directory the script starts in (the node's workdir)
    vm       absent without namespaces; else {hostname, iface, address, gateway, root,
             binds: [[path inside the node, path on the host], ...]}

With ``vm`` it first makes the namespaces look like a VM of their own, and exits 125 with one
line if it cannot:

* network: the veth end rehearse moved in (``iface``) becomes ``eth0`` with ``address``
  (CIDR) and a default route through ``gateway``; ``lo`` is up;
* hostname (UTS namespace), resolving to the node's own address through its own
  ``/etc/hosts`` (a bind in ``binds``), as on a VM: gloo and NCCL pick their interface by
  resolving the hostname;
* a root of its own: a tmpfs at ``root`` holding every top-level entry of the host's ``/``
  (directories bind-mounted recursively, symlinks copied), then each ``binds`` entry mounted
  at its literal path. A path that does not exist on the host (``/checkpoint``) is created on
  that tmpfs, and so is each missing parent (its host parent is mirrored on the tmpfs entry by
  entry), so nothing is ever created on the host's own filesystem. The namespace is private:
  no mount made here is seen outside, and all of them go when the node's last process does.

Then it runs the script as its child (not exec: a PID 1 only gets the signals it handles, so
a bare trainer as PID 1 would ignore SIGTERM) and reaps every process of the node. On SIGTERM
it stays up until all of them have exited, as a VM's shutdown grace does. It exits with the
script's code (128+N for signal N).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
SETUP_FAILED = 125  # the node could not be made; never a code a recipe's run: returns by chance
IFACE_WAIT_S = 20.0  # rehearse moves the veth in right after unshare starts


def sh(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")


def mount(*args: str) -> None:
    sh("mount", *args)


def setup_network(vm: dict) -> None:
    deadline = time.monotonic() + IFACE_WAIT_S
    while vm["iface"] not in {name for _, name in socket.if_nameindex()}:
        if time.monotonic() > deadline:
            raise OSError(f"network interface {vm['iface']} never arrived")
        time.sleep(0.01)
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "set", vm["iface"], "name", "eth0")
    sh("ip", "addr", "add", vm["address"], "dev", "eth0")
    sh("ip", "link", "set", "eth0", "up")
    sh("ip", "route", "add", "default", "via", vm["gateway"])
    socket.sethostname(vm["hostname"])


def build_root(root: str, binds: list[list[str]]) -> None:
    """A tmpfs root with the host's top-level entries, and every bind at its literal path."""
    # Every proper ancestor of a missing bind target is mirrored entry by entry on the tmpfs,
    # so the target (and any missing parent) is created there and never on the host.
    mirrored = set()
    for target, _ in binds:
        if os.path.lexists(target):
            continue  # mounted over where it is: nothing to create
        parent = os.path.dirname(os.path.normpath(target))
        while True:
            mirrored.add(parent)
            if parent == "/":
                break
            parent = os.path.dirname(parent)
    mount("--make-rprivate", "/")
    mount("-t", "tmpfs", "-o", "mode=755", "skyspot-vm-root", root)

    def populate(host_dir: str, new_dir: str) -> None:
        for entry in os.scandir(host_dir):
            dst = os.path.join(new_dir, entry.name)
            if entry.path == root:
                continue
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), dst)
            elif entry.is_dir(follow_symlinks=False):
                os.mkdir(dst)
                if entry.path in mirrored:
                    populate(entry.path, dst)
                else:
                    mount("--rbind", entry.path, dst)
            else:
                open(dst, "w").close()
                mount("--bind", entry.path, dst)

    populate("/", root)
    for target, source in sorted(binds, key=lambda b: b[0].count("/")):  # parents first
        dst = root + os.path.normpath(target)
        if os.path.isdir(source):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.exists(dst):
                open(dst, "w").close()
        mount("--bind", source, dst)
    os.chroot(root)


draining = False


def drain(signum: int, frame: object) -> None:
    global draining
    draining = True  # preempted: stay up until every process of the node has exited


def main() -> int:
    with open(sys.argv[1]) as f:
        config = json.load(f)
    if os.getpid() != 1:  # no PID namespace: adopt orphans so the node's tree stays whole
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    vm = config.get("vm")
    if vm:
        try:
            setup_network(vm)
            build_root(vm["root"], vm["binds"])
        except OSError as err:
            print(f"skyspot rehearse: cannot make this node's VM: {err}", flush=True)
            return SETUP_FAILED
    signal.signal(signal.SIGTERM, drain)
    run = subprocess.Popen(["/bin/bash", "-i", config["script"]], cwd=config["cwd"])
    code = 143
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == run.pid:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            if not draining:
                break
    if os.getpid() != 1:  # what the kernel does to a namespace whose init exits
        import psutil

        for proc in psutil.Process().children(recursive=True):
            proc.kill()
    return code


if __name__ == "__main__":
    sys.exit(main())
