"""A blockwise round's communication: one tensor collective per round, and blocks balanced by cost.

Each rank solves its owned active blocks, then the ranks meet once: one `all_gather` of one flat byte buffer
per rank, laid out as

    [header: leader's stop code, this rank's signal]            float64 x 2
    [per owned active block: its BlockReport fields, the         float64 x (fields + 1 + K)
     number of per-step losses, K loss slots]
    [per owned active block: the damped flat slice's bytes, then the bytes of its buffers]

Every rank computes every rank's layout from what all of them know (owners, the active set, K, the block
sizes), so nothing but the buffer crosses the wire: no pickling, no size exchange. float64 holds every report
field and float32 loss exactly, so reports, losses and train_loss are those of one process, bit for bit.

The header lets the round's collective also carry the run's control: any rank's signal (every rank then ends
after this round), and rank 0's decision about the previous round. Ranks other than 0 start round t+1 while
rank 0 records round t (its events, evaluation, stoppers); rank 0 ends the run by sending its stop code in the
slot of round t+1's collective instead of a payload, and the others take their round t+1 back (LeaderStopped).
On rounds where rank 0 measures lambda = "auto" the lambda broadcast carries the stop code instead.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist
from torch import Tensor

from bcdcore.algorithm import BlockReport
from bcdcore.run.distributed import Comm, assign_blocks, byte_view
from bcdcore.run.host_exchange import HostExchange

REPORT_FIELDS = [f.name for f in dataclasses.fields(BlockReport)]
_CASTS = {"int": int, "bool": bool, "float": float}
REPORT_TYPES = [_CASTS.get(str(f.type), float) for f in dataclasses.fields(BlockReport)]
HEADER = 2  # stop code, signal
STOP_STATES = {1: ("finished", "stopped by rank 0"), 2: ("failed", "stopped by rank 0")}  # 3: killed


class LeaderStopped(Exception):
    """Rank 0 ended the run after the previous round (code 1 finished, 2 failed, 3 killed by `signum`)."""

    def __init__(self, code: int, signum: int) -> None:
        super().__init__(f"rank 0 stopped the run (code {code})")
        self.code, self.signum = code, signum


def balance_blocks(costs: list[float], world: int) -> list[int]:
    """owner[i] for every block, balancing the ranks' summed cost (FLOPs of a block's inner step): costliest
    block first onto the least-loaded rank (lowest rank on ties); then the ranks are renumbered by load, so
    rank 0, which also records the run, takes the lightest share."""
    owner = assign_blocks(costs, world)
    load = [0.0] * world
    for i, r in enumerate(owner):
        load[r] += costs[i]
    order = sorted(range(world), key=lambda r: (load[r], r))  # order[new] = old
    new = {old: n for n, old in enumerate(order)}
    return [new[o] for o in owner]


def pack_reports(mine: list, blocks: list[int], K: int, code: int, signum: int) -> list[float]:
    """A rank's header and reports as float64 values: [code, signal], then per block of `blocks` (in that
    order) its BlockReport fields, the number of its losses and K loss slots (unused ones 0)."""
    by_block = {report.block: (report, losses) for report, losses in mine}
    values = [float(code), float(signum)]
    for i in blocks:
        report, losses = by_block[i]
        if len(losses) > K:
            raise ValueError(f"block {i}: {len(losses)} losses, more than K = {K}")
        values += [float(getattr(report, name)) for name in REPORT_FIELDS] + [float(len(losses))]
        values += [float(v) for v in losses] + [0.0] * (K - len(losses))
    return values


def unpack_reports(meta: list[float], n_blocks: int, K: int) -> list[tuple[BlockReport, list[float]]]:
    """The inverse of pack_reports (after the header): [(report, losses)] for the rank's n_blocks blocks."""
    row = len(REPORT_FIELDS) + 1 + K
    out = []
    for j in range(n_blocks):
        start = HEADER + j * row
        fields = meta[start:start + len(REPORT_FIELDS)]
        report = BlockReport(**{name: cast(v) for name, cast, v in zip(REPORT_FIELDS, REPORT_TYPES, fields)})
        n = int(meta[start + len(REPORT_FIELDS)])
        out.append((report, meta[start + len(REPORT_FIELDS) + 1:start + len(REPORT_FIELDS) + 1 + n]))
    return out


class RoundComm(Comm):
    """A Comm whose blockwise round is one collective (with `piggyback` set by the run): the trainer's
    `exchange_blocks` only stages the damped blocks and its `all_gather_object` of the round's reports sends
    both, with the losses and the header, in one `all_gather`. Entire mode and everything else are Comm's."""

    def __init__(self, cfg, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.piggyback = False  # set by DistributedRun for blockwise runs
        self.K = 0
        self.peer_signal = 0  # the largest signal any rank put in this round's header
        self._staged: tuple | None = None
        self._host: HostExchange | None = None  # sockets between this host's ranks (open_exchange)
        self.exchange = f"{cfg.backend} all_gather"  # how the round's buffer travels, for the record

    def open_exchange(self, device: torch.device) -> str:
        """Choose how a blockwise round's buffer travels, before the first round (a collective: every rank
        calls it). Over sockets when every rank is on this host and the parameters are on the CPU
        (`distributed.exchange = "auto"`, bcdcore.run.host_exchange), else the backend's all_gather; every rank
        takes the same branch (same recipe, world and device type, and the set-up's own agreement). Returns a
        line for the run's log."""
        one_host = os.environ.get("LOCAL_WORLD_SIZE") == str(self.world)
        if not (self.cfg.exchange == "auto" and one_host and device.type == "cpu" and sys.platform != "win32"
                and dist.get_backend() == "gloo"):
            return f"round exchange: {self.exchange}"
        self._host, problem = HostExchange.connect(self.cfg.timeout_s)
        if self._host is None:
            return f"round exchange: {self.exchange} (the host's sockets could not be used: {problem})"
        self.exchange = "host sockets"
        return f"round exchange: Unix-domain sockets between this host's {self.world} ranks"

    def _all_gather(self, gathered: list[Tensor], buf: Tensor) -> None:
        """The round's one collective, by the transport open_exchange chose."""
        if self._host is not None:
            self._host.all_gather(gathered, buf)
        else:
            dist.all_gather(gathered, buf)

    # --- the round's layout, known to every rank
    def _per_rank(self, active: list[int]) -> list[list[int]]:
        per_rank: list[list[int]] = [[] for _ in range(self.world)]
        for i in active:
            per_rank[self.owner[i]].append(i)
        return per_rank

    def _meta_len(self, blocks: list[int]) -> int:
        return HEADER + len(blocks) * (len(REPORT_FIELDS) + 1 + self.K)

    @staticmethod
    def _tensors(params, i: int) -> tuple[Tensor, ...]:
        return (params.block(i), *params.block_buffers[i])

    def _state_bytes(self, params, i: int) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors(params, i))

    def _lengths(self, params, per_rank: list[list[int]]) -> tuple[list[int], list[int]]:
        """Per rank: bytes of model state, and the whole payload (header and reports first)."""
        state = [sum(self._state_bytes(params, i) for i in blocks) for blocks in per_rank]
        return state, [8 * self._meta_len(blocks) + s for blocks, s in zip(per_rank, state)]

    # --- the trainer's calls
    def exchange_blocks(self, params, active: list[int]) -> None:
        if not self.piggyback:
            return super().exchange_blocks(params, active)
        self._staged = (params, list(active))  # sent with the reports: the trainer's next call

    def all_gather_object(self, obj) -> list:
        if self._staged is None:
            return super().all_gather_object(obj)
        params, active = self._staged
        self._staged = None
        return self._round(params, active, obj)

    def end_round(self) -> None:
        if not self.piggyback:
            return super().end_round()
        # the decision rides in the next round's collective: no message of its own
        self.bytes_total += self.bytes_round
        self.sim_total += self.sim_round
        if self.cfg.sleep and self.sim_round > 0:
            import time
            time.sleep(self.sim_round)

    # --- the one collective
    def _round(self, params, active: list[int], mine: list) -> list:
        per_rank = self._per_rank(active)
        state, lengths = self._lengths(params, per_rank)
        total = sum(state)
        self.account((self.world - 1) * total, max(total - s for s in state))
        meta = torch.tensor(pack_reports(mine, per_rank[self.rank], self.K, 0, self.local_signal()),
                            dtype=torch.float64)
        buf = torch.zeros(max(lengths), dtype=torch.uint8, device=params.flat.device)
        buf[:meta.numel() * 8].copy_(byte_view(meta))
        offset = meta.numel() * 8
        for i in per_rank[self.rank]:
            for t in self._tensors(params, i):
                n = t.numel() * t.element_size()
                buf[offset:offset + n].copy_(byte_view(t))
                offset += n
        gathered = [torch.empty_like(buf) for _ in range(self.world)]
        self._all_gather(gathered, buf)
        metas = [gathered[r][:8 * self._meta_len(per_rank[r])].cpu().view(torch.float64).tolist()
                 for r in range(self.world)]
        if metas[0][0] and not self.leader:
            raise LeaderStopped(int(metas[0][0]), int(metas[0][1]))
        self.peer_signal = int(max(m[1] for m in metas))
        out = []
        for r, blocks in enumerate(per_rank):
            out.append(unpack_reports(metas[r], len(blocks), self.K))
            if r == self.rank:
                continue
            offset = 8 * self._meta_len(blocks)
            for i in blocks:
                for t in self._tensors(params, i):
                    n = t.numel() * t.element_size()
                    byte_view(t).copy_(gathered[r][offset:offset + n])
                    offset += n
        return out

    # --- rank 0's stop, in the slot of the next collective
    def send_stop(self, code: int, signum: int, params, active: list[int]) -> None:
        """Rank 0: end the run in place of the next round's collective (`active`: that round's blocks, so the
        buffer has the size the other ranks expect)."""
        _, lengths = self._lengths(params, self._per_rank(active))
        buf = torch.zeros(max(lengths), dtype=torch.uint8, device=params.flat.device)
        buf[:16].copy_(byte_view(torch.tensor([float(code), float(signum)], dtype=torch.float64)))
        self._all_gather([torch.empty_like(buf) for _ in range(self.world)], buf)

    def share_floats(self, values: list[float] | None, n: int, code: int = 0, signum: int = 0) -> list[float]:
        """Rank 0's `n` floats (lambda = "auto") to every rank in one broadcast, with its stop code: a rank
        other than 0 raises LeaderStopped when the code says the run has ended."""
        t = torch.zeros(HEADER + n, dtype=torch.float64, device=self.device)
        if self.leader:
            t[0], t[1] = float(code), float(signum)
            if values is not None:
                t[HEADER:] = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(t, src=0)
        head = t[:HEADER].tolist()
        if head[0] and not self.leader:
            raise LeaderStopped(int(head[0]), int(head[1]))
        return t[HEADER:].tolist()
