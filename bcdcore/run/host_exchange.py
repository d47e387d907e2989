"""The ranks of one host exchange a blockwise round's buffer over Unix-domain sockets instead of gloo.

Why: a round's one collective is an all_gather of equal-length byte buffers. On a small CPU host gloo takes
about 1 ms for it whatever the size (its worker threads wake up for every step of the ring); one stream
socket between each pair of ranks moves the same 300 KB in about 0.1 ms (bench/RESULTS.md). Across hosts, or
with CUDA tensors, the backend's all_gather is used (`RoundComm`).

Set-up is a collective: rank 0 draws a random key and broadcasts it through the process group; every rank
listens on an address made from the key and its rank (Linux: the abstract namespace, so no file is left
behind; elsewhere a socket file in the temp folder, removed once everyone is connected), connects to every
lower rank and sends the key and its rank, then accepts the higher ranks; a connection that does not present
the key is dropped. The ranks agree after each step, so where sockets cannot be used (a sandbox without
Unix-domain sockets, ranks in different network namespaces) they all keep the backend's all_gather. The
exchange itself sends this rank's buffer to every peer and receives each peer's, all at once (non-blocking
sockets under one selector), so no pair waits on another.

A rank that dies closes its sockets: its peers' exchange fails at once with one line naming it, as gloo's does
("Connection closed by peer"). A rank that stays alive but silent fails the others after `timeout_s`.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import selectors
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import Tensor

KEY_BYTES = 16
HELLO_BYTES = KEY_BYTES + 4  # the key, then the connecting rank (uint32, little-endian)


def address(key: bytes, rank: int) -> str:
    """Where `rank` listens: named by a hash of the key, so the name (visible in /proc/net/unix) does not
    give the key away."""
    name = f"bcdcore-{hashlib.sha256(key).hexdigest()[:16]}-{rank}"
    if sys.platform.startswith("linux"):
        return "\0" + name  # abstract namespace: no file to clean up, no path-length limit to meet
    return os.path.join(tempfile.gettempdir(), name)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _agree(problem: str) -> str:
    """All ranks learn whether any had a problem (an all_reduce, MAX of 0/1); the others' words are not sent,
    so a rank that had none says which step failed elsewhere."""
    flag = torch.tensor([1 if problem else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return ""
    return problem or "another rank could not set up its sockets (its log says why)"


def connect_peer(where: str, key: bytes, rank: int, timeout_s: float) -> socket.socket:
    """Connect to a lower rank listening at `where` and introduce ourselves."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.connect(where)
    sock.sendall(key + rank.to_bytes(4, "little"))
    return sock


def accept_peers(listener: socket.socket, key: bytes, rank: int, world: int,
                 timeout_s: float) -> dict[int, socket.socket]:
    """The connections of ranks rank+1 .. world-1, by rank. A connection that does not present the key, or
    names a rank that is not expected or already connected, is closed and the wait goes on. socket.timeout
    (an OSError) when they are not all in after `timeout_s`."""
    peers: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(peers) < world - 1 - rank:
            listener.settimeout(max(0.001, deadline - time.monotonic()))
            sock, _ = listener.accept()
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                hello = _recv_exactly(sock, HELLO_BYTES)
            except OSError:
                hello = b""
            higher = int.from_bytes(hello[KEY_BYTES:], "little") if len(hello) == HELLO_BYTES else -1
            if not hmac.compare_digest(hello[:KEY_BYTES], key) or not rank < higher < world or higher in peers:
                sock.close()  # not one of this run's ranks
                continue
            peers[higher] = sock
    except BaseException:
        for sock in peers.values():
            sock.close()
        raise
    return peers


class HostExchange:
    """Direct sockets between every pair of this host's ranks; `all_gather` as torch.distributed's, for
    contiguous CPU tensors of the same size on every rank."""

    def __init__(self, rank: int, peers: dict[int, socket.socket], timeout_s: float) -> None:
        self.rank = rank
        self.peers = peers
        self.timeout_s = timeout_s
        for sock in peers.values():
            sock.setblocking(False)

    @classmethod
    def connect(cls, timeout_s: float) -> tuple[HostExchange | None, str]:
        """Every rank of the (default) process group calls this together. Returns (the exchange, "") or, when
        any rank could not listen, connect or be reached, (None, why) on every rank alike: the ranks agree
        after each step (an all_reduce of "ok" flags), so they all fall back to the backend together."""
        rank, world = dist.get_rank(), dist.get_world_size()
        shared = torch.frombuffer(bytearray(os.urandom(KEY_BYTES)), dtype=torch.uint8)
        dist.broadcast(shared, src=0)
        key = bytes(shared.tolist())
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mine = address(key, rank)
        peers: dict[int, socket.socket] = {}
        problem = ""
        try:
            # 1. everyone listens (the backlog holds every higher rank's connection until it is accepted)
            try:
                listener.bind(mine)
                listener.listen(world)
            except OSError as exc:
                problem = f"rank {rank} could not listen ({exc.strerror or exc})"
            problem = _agree(problem)
            # 2. everyone connects to the lower ranks: queued in their backlogs, so nobody waits for an accept
            if not problem:
                try:
                    for lower in range(rank):
                        peers[lower] = connect_peer(address(key, lower), key, rank, timeout_s)
                except OSError as exc:
                    problem = f"rank {rank} could not reach rank {lower} ({exc.strerror or exc})"
                problem = _agree(problem)
            # 3. everyone takes the higher ranks' connections (already queued: no wait unless one was lost)
            if not problem:
                try:
                    peers.update(accept_peers(listener, key, rank, world, timeout_s))
                except OSError as exc:
                    problem = f"rank {rank} was not reached by every higher rank ({exc.strerror or exc})"
                problem = _agree(problem)
        finally:
            listener.close()
            if not mine.startswith("\0"):
                try:
                    os.unlink(mine)
                except OSError:
                    pass
        if problem:
            for sock in peers.values():
                sock.close()
            return None, problem
        return cls(rank, peers, timeout_s), ""

    def all_gather(self, out: list[Tensor], buf: Tensor) -> None:
        """out[r] = rank r's `buf`, on every rank."""
        out[self.rank].copy_(buf)
        send = memoryview(buf.numpy()).cast("B")
        n = len(send)
        sent = dict.fromkeys(self.peers, 0)
        received = dict.fromkeys(self.peers, 0)
        views = {peer: memoryview(out[peer].numpy()).cast("B") for peer in self.peers}
        with selectors.DefaultSelector() as selector:
            for peer, sock in self.peers.items():
                selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)
            deadline = time.monotonic() + self.timeout_s
            waiting = len(self.peers)
            while waiting:
                events = selector.select(timeout=max(0.0, deadline - time.monotonic()))
                if not events:
                    late = [p for p in self.peers if received[p] < n or sent[p] < n]
                    raise TimeoutError(f"rank {self.rank}: rank {late[0]} did not answer for {self.timeout_s:g} s "
                                       "(distributed.timeout_s) in the round's exchange")
                for key, mask in events:
                    peer, sock = key.data, key.fileobj
                    try:
                        if mask & selectors.EVENT_READ and received[peer] < n:
                            got = sock.recv_into(views[peer][received[peer]:])
                            if got == 0:
                                raise ConnectionResetError("connection closed")
                            received[peer] += got
                        if mask & selectors.EVENT_WRITE and sent[peer] < n:
                            sent[peer] += sock.send(send[sent[peer]:])
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        raise ConnectionError(f"rank {self.rank}: rank {peer} closed its connection during the "
                                              f"round's exchange ({exc.strerror or exc})") from exc
                    if received[peer] == n and sent[peer] == n:
                        selector.unregister(sock)
                        waiting -= 1
                    elif sent[peer] == n:
                        selector.modify(sock, selectors.EVENT_READ, peer)
                    elif received[peer] == n:
                        selector.modify(sock, selectors.EVENT_WRITE, peer)

    def close(self) -> None:
        for sock in self.peers.values():
            sock.close()
        self.peers = {}
