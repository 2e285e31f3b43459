"""A real Flower deployment on 127.0.0.1 for tests: one SuperLink and SuperNodes as separate processes.

Every process (and every process they start: Flower's SuperExec, ServerApp and ClientApp processes) is
stopped by PID at the end; :meth:`Cluster.stop` returns the PIDs it stopped so a test can check that
none is left.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

BIN = Path(sys.executable).parent


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Cluster:
    """``flower-superlink`` plus ``adapterhub fed node`` processes (each in its own session)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.logs = tmp / "flower-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # The nodes' ClientApps use as many torch threads as this process: the tests compare their training with
        # the in-process engine's bit for bit, and on some CPUs (AVX-512) a matrix product's float sums come out
        # differently with another thread count (test modules set 1 or 2 threads when imported).
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        FLWR_HOME=str(tmp / "flwr-home"), FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2",
                        OMP_NUM_THREADS=str(torch.get_num_threads()))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        self.procs[name] = p
        return p

    def start_superlink(self, timeout: float = 90) -> None:
        self._start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.procs["superlink"].poll() is not None:
                    raise RuntimeError("flower-superlink exited: " + self.log("superlink")[-2000:]) from None
                time.sleep(0.2)
        raise RuntimeError("flower-superlink did not open its port")

    def add_node(self, home: Path, client_id: int, base: str, data: str, *extra: str, timeout: float = 120) -> None:
        """``adapterhub fed node`` (which execs flower-supernode: its PID is the SuperNode's).

        Waits until the SuperNode's HTTP API is listening (or the process exits). Its port is picked free here and
        bound later by the node, so another process can take it in between ("address already in use", seen under
        CI load): the node is then started again on a new port, up to 5 times."""
        name = f"node{client_id}"
        for _ in range(5):
            p = self._start(name, [sys.executable, "-m", "adapterhub.cli.main", "--home", str(home), "fed", "node",
                                   "--superlink", self.address, "--insecure", "--client-id", str(client_id),
                                   "--base", base, "--data", data, "--port", str(free_port()), *extra])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and p.poll() is None and "Uvicorn running on" not in self.log(name):
                time.sleep(0.2)
            if p.poll() is None or "address already in use" not in self.log(name):
                return
            p.wait(timeout=10)

    def wait_connected(self, names: list[str], timeout: float = 120) -> None:
        """Wait until each named SuperNode has registered with the SuperLink (its log shows its node id)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("SuperNode ID" in self.log(n) for n in names):
                return
            for n in names:
                if self.procs[n].poll() is not None:
                    raise RuntimeError(f"{n} exited: " + self.log(n)[-2000:])
            time.sleep(0.2)
        raise RuntimeError(f"SuperNodes {names} did not connect")

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> list[int]:
        """SIGKILL one process and everything it started, by PID."""
        p = self.procs[name]
        pids = [p.pid, *descendants(p.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=10)
        return pids

    def stop(self) -> list[int]:
        """Stop every process of the cluster (and their children) by PID; returns the PIDs."""
        pids: list[int] = []
        for p in self.procs.values():
            pids += [p.pid, *descendants(p.pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(alive(x) for x in pids):
                for p in self.procs.values():
                    p.poll()
                time.sleep(0.1)
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return pids
