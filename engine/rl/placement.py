"""Placement: which rank runs which role inside one launch, and the links between roles.

``colocate`` needs nothing from here: every rank trains and generates.

``split`` (one ``deepspeed --num_gpus N`` or ``torchrun`` launch, ``N > rollout_ranks``):

* ranks ``0 .. T-1`` (``T = N - rollout_ranks``) are **trainers**. Their default process group
  holds only them, so DeepSpeed ZeRO shards actor and critic over the trainers and never waits
  for a rollout rank. ``RANK``/``WORLD_SIZE`` are rewritten to the trainer numbering.
* ranks ``T .. N-1`` are **rollout** ranks. They join no default group of ours (vLLM builds its
  own world of one, exactly as under a plain ``python``) and run :func:`tritonrlhf.engine.rl.rollout_server.serve`.
* a **weight group** (a stand-alone ``torch.distributed`` process group: gloo on CPU, NCCL on
  GPU) joins trainer 0 (root) and every rollout rank; weights are broadcast through it in
  packed buckets (``tritonrlhf.engine.rl.weight_sync.BroadcastWeightSync``).
* small **control messages** (generate requests, samples, weight-sync headers, errors) go
  through the launch's TCP store, keyed ``rlhf/<channel>/<seq>``, as JSON (``tritonrlhf.engine.rl.wire``:
  the store listens on the network with more than one node, so nothing read from it may run code). A store ``set`` never blocks
  on the peer, so a trainer that is pushing weights and a rollout rank that is returning samples
  cannot deadlock each other. Every wait on the peer is bounded by ``placement.timeout_s``.

Everything rides on the launcher's ``MASTER_ADDR:MASTER_PORT``: trainer 0 hosts the store
(under ``torchrun`` the agent already does, and every worker is a client).
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from tritonrlhf.engine.distributed import DIST_ENV_VARS, launched
from tritonrlhf.engine.rl import wire

_PREFIX = "rlhf"


class RolloutLinkError(RuntimeError):
    """A peer of the trainer/rollout link died, hung past the timeout, or reported an error."""


class Channel:
    """Ordered one-way messages ``src -> dst`` over the TCP store (JSON, ``tritonrlhf.engine.rl.wire``).

    ``send`` never waits for the receiver; ``recv`` waits at most ``timeout_s`` for the next
    message and deletes it once read.
    """

    def __init__(self, store: Any, name: str, timeout_s: float, peer: str) -> None:
        self.store, self.name, self.timeout_s, self.peer = store, name, timeout_s, peer
        self._sent = 0
        self._received = 0

    def _key(self, seq: int) -> str:
        return f"{_PREFIX}/{self.name}/{seq}"

    def send(self, obj: Any) -> None:
        self.store.set(self._key(self._sent), wire.encode(obj))
        self._sent += 1

    def recv(
        self, timeout_s: float | None = None, patient: bool = False, key: str = "placement.timeout_s"
    ) -> Any:
        """The next message; raises :class:`RolloutLinkError` naming the peer on timeout or loss.

        ``patient``: wait as long as the store is reachable (a rollout rank idling while the
        trainers train); only a lost store (its host, trainer 0, died) ends the wait. ``key``: the
        config key the error names as the bound.
        """
        slot = self._key(self._received)
        wait = self.timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        try:
            while True:
                try:
                    self.store.wait([slot], datetime.timedelta(seconds=wait))
                    break
                except tdist.DistStoreError:
                    if not patient:
                        raise
            data = self.store.get(slot)
            self.store.delete_key(slot)
        except Exception as e:  # DistStoreError (timeout) or DistNetworkError (store host gone)
            waited = time.monotonic() - t0
            raise RolloutLinkError(
                f"{self.peer} did not answer on {self.name!r} within {waited:.0f}s "
                f"({key}={wait:g}): it died or hung; check its log. ({e})"
            ) from None
        self._received += 1
        try:
            msg = wire.decode(data)
        except wire.WireError as e:
            raise RolloutLinkError(
                f"refused message {slot!r} (from {self.peer}'s side of the link): {e}. It is not one "
                "this engine sends, and nothing in it was run; another process may be writing to "
                "this launch's store (MASTER_PORT)"
            ) from None
        if isinstance(msg, dict) and "error" in msg:
            raise RolloutLinkError(f"{self.peer} failed:\n{msg['error']}")
        return msg


@dataclass
class Placement:
    """This process's place in a ``split`` launch (see the module docstring).

    ``weight_group`` is set on trainer 0 and on rollout ranks (its rank 0 is trainer 0, rollout
    rank ``i`` is ``i + 1``); ``store`` on every rank.
    """

    role: str  # trainer | rollout
    global_rank: int
    global_world: int
    num_trainers: int
    num_rollout: int
    timeout_s: float
    store: Any
    weight_group: Any | None
    weight_device: torch.device

    @property
    def rollout_index(self) -> int:
        """0-based index of this rollout rank (only for role == rollout)."""
        return self.global_rank - self.num_trainers

    @property
    def is_coordinator(self) -> bool:
        """Trainer 0 talks to the rollout ranks for all trainers."""
        return self.role == "trainer" and self.global_rank == 0

    def _channel(self, name: str, peer: str) -> Channel:
        """One ``Channel`` per name in this process: its sequence numbers must not fork."""
        channels = self.__dict__.setdefault("_channels", {})
        if name not in channels:
            channels[name] = Channel(self.store, name, self.timeout_s, peer)
        return channels[name]

    def to_rollout(self, i: int) -> Channel:
        """Commands trainer 0 -> rollout rank ``i`` (in order: hello, generate, weights, stop)."""
        return self._channel(f"cmd{i}", f"trainer 0 (for rollout rank {i})")

    def from_rollout(self, i: int) -> Channel:
        """Replies rollout rank ``i`` -> trainer 0 (ready, samples, errors)."""
        rank = self.num_trainers + i
        return self._channel(f"out{i}", f"rollout engine {i} (global rank {rank})")


def _new_group(store: Any, name: str, rank: int, size: int, timeout_s: float, device: torch.device):
    """A stand-alone process group over ``store`` (not registered as a default/world group)."""
    prefixed = tdist.PrefixStore(f"{_PREFIX}/{name}", store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        opts = tdist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return tdist.ProcessGroupNCCL(prefixed, rank, size, opts)
    return tdist.ProcessGroupGloo(prefixed, rank, size, timeout)


def setup_split(rollout_ranks: int, timeout_s: float) -> Placement:
    """Assign this process its ``split`` role and build the groups; call once, before any role.

    Trainers leave here with the default process group initialised over the trainers only.
    Rollout ranks leave with the launcher's variables removed from the environment, so vLLM
    builds its own world of one.
    """
    from tritonrlhf.engine.config import ConfigError

    if not launched():
        raise ConfigError(
            "placement.mode=split needs a launch with more than placement.rollout_ranks processes: "
            "deepspeed --num_gpus N --module tritonrlhf.engine.cli ppo ... (or torchrun --nproc-per-node N)"
        )
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if not 1 <= rollout_ranks < world:
        raise ConfigError(
            f"placement.rollout_ranks={rollout_ranks} must be in [1, world_size - 1] = [1, {world - 1}] "
            f"(world size {world}: at least one trainer and one rollout rank)"
        )
    if tdist.is_initialized():
        raise RuntimeError("setup_split must run before torch.distributed is initialised")
    trainers = world - rollout_ranks
    role = "trainer" if rank < trainers else "rollout"
    cuda = torch.cuda.is_available()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = tdist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent_store,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    weight_device = (
        torch.device("cuda", 0 if role == "rollout" else local_rank) if cuda else torch.device("cpu")
    )
    if role == "trainer":
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(trainers)
        if cuda:
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(
            "nccl" if cuda else "gloo",
            store=tdist.PrefixStore(f"{_PREFIX}/trainers", store),
            rank=rank,
            world_size=trainers,
            timeout=datetime.timedelta(seconds=max(timeout_s, 1800.0)),
        )
    else:
        if cuda:  # vLLM's single-process executor uses cuda:0: make that this rank's GPU
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[local_rank] if visible[0] else str(local_rank)
        for var in DIST_ENV_VARS:
            os.environ.pop(var, None)
    group = None
    if role == "rollout" or rank == 0:
        link_rank = 0 if role == "trainer" else rank - trainers + 1
        group = _new_group(store, "weights", link_rank, rollout_ranks + 1, timeout_s, weight_device)
    return Placement(role, rank, world, trainers, rollout_ranks, timeout_s, store, group, weight_device)


def broadcast(group: Any, tensor: torch.Tensor, root: int = 0):
    """Asynchronous broadcast on a stand-alone group; returns the work handle."""
    opts = tdist.BroadcastOptions()
    opts.rootRank = root
    opts.rootTensor = 0
    return group.broadcast([tensor], opts)


def wait(work: Any, timeout_s: float, what: str) -> None:
    """Wait for ``work`` at most ``timeout_s``; a dead or hung peer becomes a RolloutLinkError."""
    try:
        work.wait(datetime.timedelta(seconds=timeout_s))
    except Exception as e:
        raise RolloutLinkError(f"{what} failed or timed out after {timeout_s:g}s: {e}") from None
