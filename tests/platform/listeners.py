"""Which processes listen where: the listening TCP sockets of processes, read from Linux's /proc.

`/proc/net/tcp` and `/proc/net/tcp6` list every socket of the network namespace with its local address, state and
inode; `/proc/<pid>/fd/*` links to `socket:[<inode>]` for each socket a process holds. Joining the two gives each
process's listening sockets without psutil (not a dependency) or `ss` (not on every CI image). Only processes of
the same user are readable, which is all the stack's.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

LISTEN = "0A"
WILDCARDS = {"0.0.0.0", "::"}


@dataclass(frozen=True)
class Listener:
    pid: int
    address: str
    port: int
    name: str = field(compare=False, default="?")  # a Ray worker renames itself per task

    @property
    def wildcard(self) -> bool:
        return self.address in WILDCARDS

    def __str__(self) -> str:
        return f"{self.name}[{self.pid}] on {self.address}:{self.port}"


def _decode(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # the kernel prints the address as 32-bit words in host byte order (little-endian here)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(port, 16)


def listening_inodes() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket of this network namespace."""
    out: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == LISTEN:
                out[int(fields[9])] = _decode(fields[1])
    return out


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def listeners(pids: set[int] | None = None) -> set[Listener]:
    """The listening TCP sockets held by `pids` (default: every readable process)."""
    inodes = listening_inodes()
    found: set[Listener] = set()
    candidates = pids if pids is not None else {int(p) for p in os.listdir("/proc") if p.isdigit()}
    for pid in candidates:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and int(link[8:-1]) in inodes:
                address, port = inodes[int(link[8:-1])]
                found.add(Listener(pid, address, port, process_name(pid)))
    return found


def descendants(root: int) -> set[int]:
    """`root` and every process below it (from each process's PPid in /proc/<pid>/stat)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree


class ListenerWatch:
    """Samples the listening sockets of the processes `pids()` names, over and over, until stopped: what a test
    asserts about listeners while a job runs (processes come and go, so one sample could miss them).

    `seen` holds each (pid, address, port) once, with the process title of the first sample that saw it. A Ray
    worker retitles itself per task (`ray::IDLE`, then `ray::RayTrainWorker...` once it hosts the actor), so `titles`
    keeps every title each listening pid had over all samples: ask it what a process was, not `seen`."""

    def __init__(self, pids) -> None:
        self._pids = pids
        self.seen: set[Listener] = set()
        self.titles: dict[int, set[str]] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sample = listeners(set(self._pids()))
                for listener in sample:
                    self.titles.setdefault(listener.pid, set()).add(listener.name)
                self.seen |= sample
                self.samples += 1
            except (OSError, ValueError):  # a process ended mid-read: the next sample sees the rest
                pass
            self._stop.wait(0.2)

    def pids_titled(self, word: str) -> set[int]:
        """The listening pids that carried `word` in their title in at least one sample."""
        return {pid for pid, titles in self.titles.items() if any(word in title for title in titles)}

    def __enter__(self) -> ListenerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
