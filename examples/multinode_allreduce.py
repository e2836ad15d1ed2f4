"""A payload for several nodes: a sum over every copy, through a TCP rendezvous at MASTER_ADDR:MASTER_PORT.

It is what ``torch.distributed`` and ``torchrun`` do at start (rank 0 listens, the others connect), written with
the standard library only, so it runs in any image with Python. Each copy is started by offload on its own node
and told ``RANK``, ``WORLD_SIZE``, ``NODE_RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``::

    offload run --site testsite --nodes 2 --file examples/multinode_allreduce.py -- python3 multinode_allreduce.py

Every copy prints ``rank R of W on HOST: sum 3`` (1 + 2 for two copies). With torch, the same job is::

    offload run --site S --nodes 2 --gpus-per-node 4 --image docker://pytorch/pytorch --file train.py -- \\
        bash -c 'torchrun --nnodes $WORLD_SIZE --node-rank $NODE_RANK --nproc-per-node 4 \\
                 --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT train.py'
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time


def send_int(sock: socket.socket, value: int) -> None:
    sock.sendall(struct.pack("!q", value))


def recv_int(sock: socket.socket) -> int:
    data = b""
    while len(data) < 8:
        chunk = sock.recv(8 - len(data))
        if not chunk:
            raise ConnectionError("a peer left before the sum was done")
        data += chunk
    return struct.unpack("!q", data)[0]


def all_reduce(value: int, rank: int, world: int, master: tuple[str, int], timeout: float = 120) -> int:
    """The sum of ``value`` over all ``world`` copies: rank 0 gathers and sends the total back."""
    if rank == 0:
        with socket.create_server(("", master[1]), reuse_port=False) as server:
            server.settimeout(timeout)
            peers = [server.accept()[0] for _ in range(world - 1)]
            total = value + sum(recv_int(peer) for peer in peers)
            for peer in peers:
                send_int(peer, total)
                peer.close()
            return total
    deadline = time.monotonic() + timeout
    while True:  # rank 0 may not listen yet
        try:
            with socket.create_connection(master, timeout=5) as sock:
                send_int(sock, value)
                return recv_int(sock)
        except (ConnectionRefusedError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    master = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    total = all_reduce(rank + 1, rank, world, master)
    print(f"rank {rank} of {world} on {socket.gethostname()}: sum {total}", flush=True)
    return 0 if total == world * (world + 1) // 2 else 1


if __name__ == "__main__":
    sys.exit(main())
