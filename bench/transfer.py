"""Data through offload's one SSH connection vs OpenSSH's own tools, on the same sshd of the test site.

* Forward throughput through ``site.forward`` vs ``ssh -L`` (OpenSSH's defaults, what guides and jupyter-forward
  use) to the same sshd, on several stream shapes (issue 30): a 200 MiB stream from a server on the login node read
  by one reader in 1 MiB ``recv`` calls (and, for reference, read directly); the same stream read in 4 KiB
  ``recv`` calls (a reader that does little per call, so the forward's own cost per packet shows); 4 readers of
  50 MiB each through the same forward at once; and the other direction, 200 MiB sent by the client to a server
  on the login node (an upload through the forward) in 1 MiB and in 4 KiB ``sendall`` calls, timed until the server
  says it has every byte.
* Forward latency: 1 KiB request/response round trips (Dask's pattern) through both forwards.
* Large files: a 1 GiB file put and got with offload's transport (what ``Job.upload``/``download`` and ``offload
  image push`` use) vs ``scp`` (OpenSSH 9: the SFTP protocol).
* Many small files: a directory of 1,000 files of 2 KiB staged into a job's directory by one submission
  (``JobSpec(files={"d/": archive(dir)})``, which also runs ``sbatch``) vs ``scp -r`` and ``rsync -a`` of the same
  directory; the count of SSH channels offload opened is printed for 10 and 1,000 files.

The peer runs in a subprocess (it is a separate program); offload's reader runs in this process, as a user's
code does. Runs alternate; medians.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import TESTSITE, Comparison, alternate

import offload
from offload import _loop

STREAM_MIB = 200
READERS = 4  # concurrent readers through one forward
READER_MIB = 50  # what each of them reads
SMALL_READ = 4096  # bytes per recv call of the small-reads row
ROUND_TRIPS = 2000
FILE_MIB = 1024
SMALL_FILES = 1000


def _config():
    os.environ.setdefault("OFFLOAD_CONFIG", f"{TESTSITE}/offload.toml")
    return offload.load_site("testsite").config


def _ssh_args(config, port_flag: str = "-p") -> list[str]:
    """OpenSSH's options for the test site (``-P`` for scp's port)."""
    known = f"UserKnownHostsFile={config.known_hosts}"
    return [port_flag, str(config.port), "-i", config.identity_files[0], "-o", known, "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes"]  # fmt: skip


class Servers:
    """On the login node: a port per stream size streams that many MiB to each connection, one echoes, one takes
    an upload (reads to EOF, then answers the byte count). They run in a process of their own, as a login node's
    servers are not in the client's process (threads here would share its GIL with offload's I/O thread, and
    not with ``ssh -L``); the process ends with :meth:`close`, or with this one (``PR_SET_PDEATHSIG``)."""

    def __init__(self) -> None:
        spawn = multiprocessing.get_context("spawn")  # not fork: this process may run offload's I/O thread already
        parent, child = spawn.Pipe()
        self._process = spawn.Process(target=Servers._run, args=(child,), daemon=True)
        self._process.start()
        self.stream, self.small_stream, self.echo, self.sink = parent.recv()

    def close(self) -> None:
        self._process.kill()
        self._process.join()

    @classmethod
    def _run(cls, report) -> None:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: gone with the benchmark, even if killed
        streams = [cls._serve(lambda conn, mib=mib: cls._send(conn, mib)) for mib in (STREAM_MIB, READER_MIB)]
        ports = (*streams, cls._serve(cls._echo), cls._serve(cls._sink))
        report.send(ports)
        threading.Event().wait()

    @staticmethod
    def _serve(handler) -> int:
        listener = socket.create_server(("127.0.0.1", 0))

        def accept() -> None:
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=handler, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return listener.getsockname()[1]

    @staticmethod
    def _send(conn: socket.socket, mib: int) -> None:
        block = b"x" * (1 << 20)
        with conn, contextlib.suppress(OSError):  # a reader that went away (a forward closing) ends it
            for _ in range(mib):
                conn.sendall(block)

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    @staticmethod
    def _sink(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            total = 0
            while data := conn.recv(1 << 20):
                total += len(data)
            conn.sendall(str(total).encode())


def drain(port: int, mib: int = STREAM_MIB, read_size: int = 1 << 20) -> float:
    """MB/s reading the stream through ``port`` in ``recv(read_size)`` calls."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        start, total = time.perf_counter(), 0
        while data := s.recv(read_size):
            total += len(data)
    assert total == mib << 20, total
    return total / (time.perf_counter() - start) / 1e6


def drain_together(port: int, readers: int = READERS, mib: int = READER_MIB) -> float:
    """MB/s of ``readers`` streams of ``mib`` MiB read at once through ``port``: all bytes over the time from the
    moment every reader is connected to the last one's end."""
    connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(readers)]
    ready = threading.Barrier(readers + 1)
    totals = [0] * readers

    def read(i: int) -> None:
        ready.wait()
        with connections[i] as s:
            while data := s.recv(1 << 20):
                totals[i] += len(data)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    assert totals == [mib << 20] * readers, totals
    return sum(totals) / elapsed / 1e6


def upload(port: int, mib: int = STREAM_MIB, write_size: int = 1 << 20) -> float:
    """MB/s sending ``mib`` MiB through ``port`` to the sink in ``sendall(write_size)`` calls, until it answers
    that it has every byte."""
    block = b"u" * write_size
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        for _ in range((mib << 20) // write_size):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while data := s.recv(64):
            answer += data
    elapsed = time.perf_counter() - start
    assert answer == str(mib << 20).encode(), answer
    return (mib << 20) / elapsed / 1e6


def round_trip(port: int) -> float:
    """Microseconds per 1 KiB request/response through ``port``."""
    message = b"r" * 1024
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(50):  # warm up
            s.sendall(message)
            s.recv(65536)
        start = time.perf_counter()
        for _ in range(ROUND_TRIPS):
            s.sendall(message)
            got = 0
            while got < len(message):
                got += len(s.recv(65536))
    return (time.perf_counter() - start) / ROUND_TRIPS * 1e6


class OpenSSHForward:
    def __init__(self, config, remote_port: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._proc = subprocess.Popen(["ssh", *_ssh_args(config), "-N", "-L", f"{self.port}:127.0.0.1:{remote_port}",
                                       f"{config.user}@{config.host}"])  # fmt: skip
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("ssh -L did not start")

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait()


def forward_rows(runs: int) -> list[Comparison]:
    config = _config()
    servers = Servers()
    site = offload.Site(config)
    ports = {"stream": servers.stream, "small_stream": servers.small_stream, "echo": servers.echo,
             "sink": servers.sink}  # fmt: skip
    ours = {name: site.forward("127.0.0.1", port) for name, port in ports.items()}
    ssh = {name: OpenSSHForward(config, port) for name, port in ports.items()}

    def rate(what: str, measure, name: str, **kwargs) -> Comparison:
        offload_rate, ssh_rate = alternate(runs, lambda: measure(ours[name].local_port, **kwargs),
                                           lambda: measure(ssh[name].port, **kwargs))  # fmt: skip
        return Comparison(f"forward throughput, {what}", "ssh -L", offload_rate, ssh_rate, unit="MB/s",
                          lower_is_better=False, target=">= 0.95")  # fmt: skip

    try:
        rows = [rate(f"{STREAM_MIB} MiB stream, one reader, 1 MiB reads", drain, "stream")]
        direct = [drain(servers.stream) for _ in range(runs)]
        rows.append(Comparison(f"forward throughput, {STREAM_MIB} MiB stream, one reader, 1 MiB reads",
                               "direct TCP (no SSH)", rows[0].offload, direct, unit="MB/s", lower_is_better=False,
                               target="reference"))  # fmt: skip
        rows.append(rate(f"{STREAM_MIB} MiB stream, one reader, {SMALL_READ // 1024} KiB reads", drain, "stream",
                         read_size=SMALL_READ))  # fmt: skip
        rows.append(rate(f"{READERS} readers of {READER_MIB} MiB at once", drain_together, "small_stream"))
        rows.append(rate(f"upload: {STREAM_MIB} MiB sent to the login node, 1 MiB writes", upload, "sink"))
        rows.append(rate(f"upload: {STREAM_MIB} MiB sent to the login node, {SMALL_READ // 1024} KiB writes", upload,
                         "sink", write_size=SMALL_READ))  # fmt: skip
        offload_rtt, ssh_rtt = alternate(runs, lambda: round_trip(ours["echo"].local_port),
                                         lambda: round_trip(ssh["echo"].port))  # fmt: skip
        rows.append(Comparison("1 KiB request/response through the forward", "ssh -L", offload_rtt, ssh_rtt,
                               unit="us", target="<= 1.1"))  # fmt: skip
        return rows
    finally:
        for forward in ssh.values():
            forward.close()
        site.close()
        servers.close()


def file_rows(runs: int) -> list[Comparison]:
    config = _config()
    site = offload.Site(config)
    remote_dir = f"{site.workdir()}/bench-transfer"
    site.transport_run(["mkdir", "-p", remote_dir])
    local = Path(tempfile.mkdtemp(prefix="offload-bench-"))
    try:
        big = local / "big.bin"
        with big.open("wb") as f:
            for _ in range(FILE_MIB):
                f.write(os.urandom(1 << 20))
        target = f"{config.user}@{config.host}"

        def offload_put() -> float:
            start = time.perf_counter()
            _loop.run(site.transport.put(str(big), f"{remote_dir}/big.bin"))
            return FILE_MIB * 2**20 / (time.perf_counter() - start) / 1e6

        def scp_put() -> float:
            start = time.perf_counter()
            subprocess.run(["scp", "-q", *_scp_args(config), str(big),
                            f"{target}:{remote_dir}/big-scp.bin"], check=True)  # fmt: skip
            return FILE_MIB * 2**20 / (time.perf_counter() - start) / 1e6

        def offload_get() -> float:
            (local / "got.bin").unlink(missing_ok=True)
            start = time.perf_counter()
            _loop.run(site.transport.get(f"{remote_dir}/big.bin", str(local / "got.bin")))
            return FILE_MIB * 2**20 / (time.perf_counter() - start) / 1e6

        def scp_get() -> float:
            (local / "got-scp.bin").unlink(missing_ok=True)
            start = time.perf_counter()
            subprocess.run(["scp", "-q", *_scp_args(config), f"{target}:{remote_dir}/big.bin",
                            str(local / "got-scp.bin")], check=True)  # fmt: skip
            return FILE_MIB * 2**20 / (time.perf_counter() - start) / 1e6

        rows = []
        ours, theirs = alternate(runs, offload_put, scp_put)
        rows.append(Comparison(f"put a {FILE_MIB} MiB file", "scp", ours, theirs, unit="MB/s", lower_is_better=False,
                               target=">= 0.9"))  # fmt: skip
        ours, theirs = alternate(runs, offload_get, scp_get)
        rows.append(Comparison(f"get a {FILE_MIB} MiB file", "scp", ours, theirs, unit="MB/s", lower_is_better=False,
                               target=">= 0.9"))  # fmt: skip

        small = local / "small"
        for i in range(SMALL_FILES):
            (small / f"d{i % 10}").mkdir(parents=True, exist_ok=True)
            (small / f"d{i % 10}" / f"f{i}.txt").write_bytes(os.urandom(1024).hex().encode())

        def submission(files: dict) -> float:
            start = time.perf_counter()
            job = site.submit(offload.JobSpec(["true"], name="bench-stage", files=files,
                                              resources=offload.Resources(extra=("--hold",))))  # fmt: skip
            took = time.perf_counter() - start
            job.cancel()
            return took

        def offload_stage() -> float:
            return submission({"small/": offload.archive(small)})

        def offload_files_share() -> float:
            """What the files add to a submission: the same submission with them, less without."""
            return submission({"small/": offload.archive(small)}) - submission({})

        def scp_tree() -> float:
            site.transport_run(["rm", "-rf", f"{remote_dir}/small"])
            start = time.perf_counter()
            subprocess.run(["scp", "-q", "-r", *_scp_args(config), str(small), f"{target}:{remote_dir}/small"],
                           check=True)  # fmt: skip
            return time.perf_counter() - start

        def rsync_tree() -> float:
            site.transport_run(["rm", "-rf", f"{remote_dir}/small-rsync"])
            start = time.perf_counter()
            ssh = " ".join(["ssh", *_ssh_args(config)])
            subprocess.run(["rsync", "-a", "-e", ssh, f"{small}/", f"{target}:{remote_dir}/small-rsync/"], check=True)
            return time.perf_counter() - start

        ours, theirs = alternate(runs, offload_stage, scp_tree)
        rows.append(Comparison(f"{SMALL_FILES} small files into a job's directory (offload: with its sbatch)",
                               "scp -r", ours, theirs, target="<= 1"))  # fmt: skip
        if shutil.which("rsync"):
            ours, theirs = alternate(runs, offload_stage, rsync_tree)
            rows.append(Comparison(f"{SMALL_FILES} small files into a job's directory (offload: with its sbatch)",
                                   "rsync -a over ssh", ours, theirs, target="<= 1"))  # fmt: skip
            ours, theirs = alternate(runs, offload_files_share, rsync_tree)
            rows.append(Comparison(f"{SMALL_FILES} small files: what they add to a submission", "rsync -a over ssh",
                                   ours, theirs, target="<= 1"))  # fmt: skip
        for count in (10, SMALL_FILES):
            few = local / f"tree-{count}"
            for i in range(count):
                (few / f"f{i}").parent.mkdir(parents=True, exist_ok=True)
                (few / f"f{i}").write_bytes(b"x" * 2048)
            before = sum(v for k, v in site.transport.stats.items() if k.startswith(("run:", "start:", "sftp:")))
            job = site.submit(offload.JobSpec(["true"], name="bench-stage", files={"t/": offload.archive(few)},
                                              resources=offload.Resources(extra=("--hold",))))  # fmt: skip
            after = sum(v for k, v in site.transport.stats.items() if k.startswith(("run:", "start:", "sftp:")))
            job.cancel()
            print(f"[bench] staging {count} files took {after - before} SSH channel(s)", file=sys.stderr)
        return rows
    finally:
        site.transport_run(["rm", "-rf", remote_dir])
        site.close()
        shutil.rmtree(local, ignore_errors=True)


def _scp_args(config) -> list[str]:
    return _ssh_args(config, "-P")


if __name__ == "__main__":
    from common import table

    runs = int(os.environ.get("BENCH_RUNS", "3"))
    print(table(forward_rows(runs) + ([] if "--forwards" in sys.argv else file_rows(runs))))
