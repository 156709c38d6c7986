"""Worker hosts that are really separate: one network namespace, hostname and address per host.

    net = Network.create(tag)            # a bridge in the root namespace, 10.77.<n>.1/24
    host = net.add_host("h1")            # namespace, veth into the bridge, 10.77.<n>.11, /etc/hosts entry
    host.command(["airflow", ...])       # argv that runs inside the host, under the host's own hostname
    host.cut(port=6379)                  # iptables DROP of Redis only (or of everything without port)
    host.heal()
    net.destroy()                        # namespaces, veths, bridge, /etc/hosts lines: all gone

Everything is recorded in a state file under /run before it is created, so a run that crashed is cleaned
up by the next one (``cleanup_stale``). Every address stays on this machine: the bridge and the hosts'
namespaces, nothing routed anywhere else. Each iptables rule lives inside a host's namespace and dies
with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path

STATE_DIR = Path("/run/asyncq-test-hosts")
HOSTS_FILE = Path("/etc/hosts")
SUBNET = "10.77.{n}.0/24"
MARK = "# asyncq-test-hosts"


def sh(*argv: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    if netns is not None:
        argv = ("ip", "netns", "exec", netns, *argv)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def require_tools() -> None:
    if shutil.which("iptables") is None and shutil.which("apt-get") is not None and os.geteuid() == 0:
        # as devtools/services.sh does for Redis and PostgreSQL: a fresh machine may lack it
        if subprocess.run(["apt-get", "install", "-y", "-qq", "iptables"], capture_output=True).returncode:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-qq", "iptables"], capture_output=True, timeout=600)
    missing = [t for t in ("ip", "iptables", "unshare") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"the hosts tier needs {', '.join(missing)} (apt-get install -y iproute2 iptables "
                           "util-linux) and root")
    if os.geteuid() != 0:
        raise RuntimeError("the hosts tier needs root: it creates network namespaces and veth pairs")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _used_subnets() -> set[int]:
    used = set()
    for line in sh("ip", "-4", "-o", "addr", "show").stdout.splitlines():
        for word in line.split():
            if word.startswith("10.77."):
                used.add(int(word.split(".")[2]))
    for path in STATE_DIR.glob("*.json"):
        with contextlib.suppress(ValueError, OSError, KeyError):
            used.add(int(json.loads(path.read_text())["subnet"]))
    return used


@dataclasses.dataclass
class Host:
    name: str
    netns: str
    hostname: str
    address: str
    veth_root: str
    veth_host: str
    gateway: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the host's namespace, in a UTS namespace of its own named ``hostname``.
        ``ip netns exec`` and ``unshare`` exec in place, so the returned process *is* the command."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname, *argv]

    def iptables(self, *rule: str, check: bool = True) -> None:
        sh("iptables", "-w", *rule, netns=self.netns, check=check)

    def cut(self, port: int | None = None) -> None:
        """Black-hole the host's traffic to the core: to and from ``port`` on the gateway, or everything
        on its veth. DROP, not REJECT: a partition looks like silence, not like a refused connection."""
        if port is None:
            self.iptables("-I", "OUTPUT", "-o", self.veth_host, "-j", "DROP")
            self.iptables("-I", "INPUT", "-i", self.veth_host, "-j", "DROP")
        else:
            self.iptables("-I", "OUTPUT", "-p", "tcp", "-d", self.gateway, "--dport", str(port), "-j", "DROP")
            self.iptables("-I", "INPUT", "-p", "tcp", "-s", self.gateway, "--sport", str(port), "-j", "DROP")

    def heal(self) -> None:
        """Remove every rule from the host's filter table (the host has no rules of its own)."""
        self.iptables("-F", "OUTPUT")
        self.iptables("-F", "INPUT")

    def rules(self) -> str:
        return sh("iptables", "-S", netns=self.netns).stdout


class Network:
    """A bridge in the root namespace and the hosts on it; ``tag`` keeps concurrent runs apart."""

    def __init__(self, tag: str, subnet: int) -> None:
        self.tag = tag
        self.subnet = subnet
        self.bridge = f"aqbr{tag}"
        net = ipaddress.ip_network(SUBNET.format(n=subnet))
        self.gateway = str(net.network_address + 1)
        self.prefixlen = net.prefixlen
        self.hosts: list[Host] = []
        self.state_file = STATE_DIR / f"{tag}.json"

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, tag: str) -> Network:
        require_tools()
        cleanup_stale()
        free = [n for n in range(100, 250) if n not in _used_subnets()]
        if not free:
            raise RuntimeError("no free 10.77.x.0/24 subnet for the test hosts")
        net = cls(tag, free[os.getpid() % len(free)])
        net._save()
        sh("ip", "link", "add", net.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{net.gateway}/{net.prefixlen}", "dev", net.bridge)
        sh("ip", "link", "set", net.bridge, "up")
        return net

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        host = Host(name=name, netns=f"aqns-{self.tag}-{name}", hostname=f"aq{self.tag}{name}",
                    address=str(ipaddress.ip_address(self.gateway) + 10 + index),
                    veth_root=f"aqv{self.tag}{index}r", veth_host=f"aqv{self.tag}{index}h", gateway=self.gateway)
        self.hosts.append(host)
        self._save()
        sh("ip", "netns", "add", host.netns)
        sh("ip", "link", "add", host.veth_root, "type", "veth", "peer", "name", host.veth_host)
        sh("ip", "link", "set", host.veth_host, "netns", host.netns)
        sh("ip", "link", "set", host.veth_root, "master", self.bridge)
        sh("ip", "link", "set", host.veth_root, "up")
        sh("ip", "addr", "add", f"{host.address}/{self.prefixlen}", "dev", host.veth_host, netns=host.netns)
        sh("ip", "link", "set", host.veth_host, "up", netns=host.netns)
        sh("ip", "link", "set", "lo", "up", netns=host.netns)
        _add_hosts_line(self.tag, host.address, host.hostname)
        return host

    def destroy(self) -> None:
        _destroy(self.tag, self.bridge, [(h.netns, h.veth_root) for h in self.hosts])

    def _save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({
            "pid": os.getpid(), "subnet": self.subnet, "bridge": self.bridge,
            "hosts": [[h.netns, h.veth_root] for h in self.hosts],
        }))


def _destroy(tag: str, bridge: str, hosts: list[tuple[str, str]] | list[list[str]]) -> None:
    """Idempotent: what does not exist (any more) is skipped. Deleting a namespace deletes its veth end,
    the peer in the root namespace and every iptables rule in it, once no process runs in it."""
    for netns, veth_root in hosts:
        for pid in sh("ip", "netns", "pids", netns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        sh("ip", "netns", "del", netns, check=False)
        sh("ip", "link", "del", veth_root, check=False)
    sh("ip", "link", "del", bridge, check=False)
    _remove_hosts_lines(tag)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{tag}.json").unlink()


def cleanup_stale() -> list[str]:
    """Remove what an earlier run left behind: its owner pid is gone, so nobody will clean it up."""
    cleaned = []
    for path in sorted(STATE_DIR.glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
        if _pid_alive(int(state.get("pid", 0))):
            continue
        _destroy(path.stem, state["bridge"], state.get("hosts", []))
        cleaned.append(path.stem)
    return cleaned


# ---------------------------------------------------------------------------------------- /etc/hosts
def _add_hosts_line(tag: str, address: str, hostname: str) -> None:
    """So the api-server resolves a task's hostname to the host's address (the log fetch URL is
    ``http://<ti.hostname>:<worker_log_server_port>/log/...``). Written in place: /etc/hosts may be a
    bind mount that a rename would not replace."""
    with open(HOSTS_FILE, "a") as fh:
        fh.write(f"{address} {hostname} {MARK} {tag}\n")


def _remove_hosts_lines(tag: str) -> None:
    lines = HOSTS_FILE.read_text().splitlines(keepends=True)
    kept = [line for line in lines if f"{MARK} {tag}" not in line]
    if kept != lines:
        with open(HOSTS_FILE, "r+") as fh:
            fh.seek(0)
            fh.writelines(kept)
            fh.truncate()
