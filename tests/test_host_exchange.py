"""The socket exchange between the ranks of one host (bcdcore.run.host_exchange), without a process group:
"ranks" are threads joined by socket pairs. The real set-up (broadcast, barrier, connect) runs in every
2-process test, which use it by default; tests/test_distributed_rounds.py counts its calls."""
from __future__ import annotations

import os
import socket
import threading

import pytest
import torch

from bcdcore.run.host_exchange import HELLO_BYTES, HostExchange, accept_peers, address, connect_peer


def _mesh(world: int, timeout_s: float = 10.0) -> list[HostExchange]:
    peers: list[dict[int, socket.socket]] = [{} for _ in range(world)]
    for a in range(world):
        for b in range(a + 1, world):
            peers[a][b], peers[b][a] = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return [HostExchange(r, peers[r], timeout_s) for r in range(world)]


def _gather_all(mesh: list[HostExchange], bufs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    outs = [[torch.empty_like(bufs[0]) for _ in mesh] for _ in mesh]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            mesh[r].all_gather(outs[r], bufs[r])
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(mesh))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return outs


@pytest.mark.parametrize("world,size", [(2, 0), (2, 17), (2, 3_000_001), (3, 600_016), (4, 1031)])
def test_every_rank_gets_every_buffer(world, size):
    """Buffers larger than a socket's buffer (3 MB) need many partial sends and receives."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    bufs = [torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen) for _ in range(world)]
    mesh = _mesh(world)
    for _ in range(3):  # the same sockets, round after round
        outs = _gather_all(mesh, bufs)
        for r in range(world):
            for q in range(world):
                assert torch.equal(outs[r][q], bufs[q]), (r, q)
        bufs = [b.flip(0).contiguous() for b in bufs]
    for ex in mesh:
        ex.close()


def test_a_rank_that_leaves_fails_the_exchange_in_one_line_naming_it():
    mesh = _mesh(3)
    mesh[1].close()  # rank 1 died: its sockets are closed
    buf = torch.zeros(100_000, dtype=torch.uint8)
    with pytest.raises(ConnectionError, match=r"^rank 0: rank 1 closed its connection during the round's exchange"):
        mesh[0].all_gather([torch.empty_like(buf) for _ in range(3)], buf)


def test_a_silent_rank_fails_the_exchange_after_the_timeout():
    mesh = _mesh(2, timeout_s=0.2)  # rank 1 is alive but never joins the exchange
    buf = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(TimeoutError, match=r"rank 1 did not answer for 0\.2 s \(distributed\.timeout_s\)"):
        mesh[0].all_gather([torch.empty_like(buf) for _ in range(2)], buf)
    mesh[1].close()


def test_accept_takes_only_this_runs_ranks():
    """A local process that finds the listening address cannot join without the key; nor can a rank number
    that is not expected, or one already connected."""
    key = os.urandom(16)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address(key, 0) + f"-test-{os.getpid()}")
    listener.listen(8)
    where = listener.getsockname()
    joined: list[socket.socket] = []

    def knock(hello: bytes) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(where)
        sock.sendall(hello)
        joined.append(sock)

    knock(os.urandom(16) + (1).to_bytes(4, "little"))  # wrong key
    knock(key + (7).to_bytes(4, "little"))  # no such rank
    knock(key[:10])  # cut short, then closed
    joined[-1].close()
    knock(key + (1).to_bytes(4, "little"))  # the real rank 1
    knock(key + (1).to_bytes(4, "little"))  # rank 1 again
    knock(key + (2).to_bytes(4, "little"))  # the real rank 2
    try:
        peers = accept_peers(listener, key, 0, 3, timeout_s=5)
        assert sorted(peers) == [1, 2]
        peers[1].sendall(b"x")
        assert joined[3].recv(1) == b"x"  # the first connection that said rank 1 is the one kept
        peers[2].sendall(b"y")
        assert joined[5].recv(1) == b"y"
        with pytest.raises(OSError):  # nobody else is let in: a timeout
            accept_peers(listener, key, 0, 3 + 1, timeout_s=0.2)
    finally:
        for sock in joined:
            sock.close()
        listener.close()


def test_connect_peer_introduces_itself_with_the_key_and_its_rank():
    key = os.urandom(16)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address(key, 0) + f"-intro-{os.getpid()}")
    listener.listen(1)
    sock = connect_peer(listener.getsockname(), key, 5, timeout_s=5)
    conn, _ = listener.accept()
    hello = conn.recv(HELLO_BYTES)
    assert hello == key + (5).to_bytes(4, "little")
    for s in (sock, conn, listener):
        s.close()


def test_the_address_does_not_show_the_key():
    key = os.urandom(16)
    assert key.hex()[:8] not in address(key, 0) and address(key, 0) != address(key, 1)
