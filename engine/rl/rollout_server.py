"""``split`` placement: the rollout ranks' serving loop, and the trainer's client for it.

A rollout rank runs :func:`serve`: it builds its rollout engine (:func:`build_engine`:
``rollout.backend`` vLLM, or HF ``generate``) from the policy checkpoint named in trainer 0's
``hello``, then executes trainer 0's commands in the order they were sent:

* ``generate`` -- sample ``n`` responses per prompt with the given per-request seeds and send
  the :class:`~engine.rl.rollout.Sample` s back, each stamped with the engine's policy version;
* ``weights``  -- join the bucketed broadcast (``tritonrlhf.engine.rl.weight_sync.receive_weights``) and
  stamp the new version;
* ``stop``.

Because commands run in order, a ``generate`` sent after the ``weights`` of version v samples
from version >= v: that is what bounds staleness (``tritonrlhf.engine.rl.trainer`` decides how many
``generate`` requests it keeps ahead of training). Each reply carries the rank's timeline
(``generate`` and ``weight_load`` intervals, wall-clock) for the per-phase plots.
"""

from __future__ import annotations

import time
import traceback
from typing import TYPE_CHECKING, Any

from tritonrlhf.engine.rl.generation import with_columns
from tritonrlhf.engine.rl.placement import Placement

if TYPE_CHECKING:
    from tritonrlhf.engine.data import PromptBatch


def serve(cfg: Any, placement: Placement) -> dict[str, Any]:
    """Main loop of a rollout rank; returns when trainer 0 says ``stop``."""
    from tritonrlhf.engine.rl.weight_sync import receive_weights

    i = placement.rollout_index
    inbox, outbox = placement.to_rollout(i), placement.from_rollout(i)
    engine = scorer = None
    served = 0
    try:
        hello = inbox.recv(patient=True)
        engine = build_engine(cfg, hello["policy_dir"], hello)
        scorer = _Scorer(cfg, hello) if hello["scoring"] == "rollout" else None
        outbox.send({"kind": "ready", "rank": placement.global_rank})
        events: list[dict[str, Any]] = []
        while True:
            msg = inbox.recv(patient=True)
            kind = msg["kind"]
            if kind == "stop":
                break
            t0 = time.time()
            if kind == "generate":
                groups = engine.generate(msg["prompts"], n=msg["n"], seed=msg["seed"])
                events.append(_event("generate", t0, time.time(), msg["batch"]))
                samples = with_columns(groups, msg.get("columns") or [])
                if scorer is not None:
                    t1 = time.time()
                    scorer.score(samples)
                    events.append(_event("score", t1, time.time(), msg["batch"]))
                outbox.send({"kind": "samples", "batch": msg["batch"], "samples": samples, "events": events})
                events = []
                served += 1
            elif kind == "probe":
                outbox.send(
                    {"kind": "probe", "logprobs": engine.sequence_logprobs(msg["prompt"], msg["response"])}
                )
            elif kind == "weights":
                stats = receive_weights(placement, msg["specs"], engine, msg["version"])
                events.append(_event("weight_load", t0, time.time(), msg["version"], **stats))
            else:
                raise ValueError(f"rollout server: unknown command {kind!r}")
    except BaseException:
        try:  # tell trainer 0 why, unless the store (trainer 0's process) is itself gone
            outbox.send({"error": f"rollout rank {placement.global_rank}:\n{traceback.format_exc()}"})
        except Exception:
            pass
        raise
    finally:
        if engine is not None:
            engine.close()
        if scorer is not None:
            scorer.reward.close()
    return {"role": "rollout", "batches": served}


def build_engine(
    cfg: Any, policy_dir: str, args: dict[str, Any], tokenizer: Any = None, device: Any = None
) -> Any:
    """The rollout engine of ``cfg.rollout.backend`` on the PPO run's policy checkpoint (colocate:
    the trainer's; split: a rollout rank's). ``args``: ``seed``, ``max_len`` and ``dtype``
    (``"float32"`` / ``"bfloat16"`` / ``"float16"``). Request i of a ``generate`` call samples with
    seed ``seed + i`` (vLLM, and the HF backend's static-cache loop), so a batch cut between ranks
    samples what it samples whole; only the HF backend's transformers ``generate`` fallback takes
    one seed per call."""
    from tritonrlhf.engine.models import load_tokenizer, resolve_dtype
    from tritonrlhf.engine.rl.engines import open_rollout

    dtype = resolve_dtype(args["dtype"], device)
    if cfg.rollout.backend == "hf" and tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.tokenizer or policy_dir)
    return open_rollout(
        policy_dir,
        cfg.rollout,
        tokenizer,
        args["seed"],
        args["max_len"],
        dtype,
        cfg.model.attn_implementation,
        device=device,
    )


class _Scorer:
    """Reference log-probs and rewards beside the rollout engine (``placement.scoring=rollout``)."""

    def __init__(self, cfg: Any, hello: dict[str, Any]) -> None:
        import torch

        from tritonrlhf.engine.models import load_tokenizer, resolve_dtype
        from tritonrlhf.engine.rl.scoring import build_scoring

        self.tokenizer = load_tokenizer(cfg.model.tokenizer or hello["policy_dir"])
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        dtype = resolve_dtype(hello["dtype"], device)
        route = None
        if cfg.reward.kind == "model":  # the trainer ranks checked it and logged the route
            from tritonrlhf.engine.rl.reward_route import resolve_reward_route

            route = resolve_reward_route(
                cfg.reward.tokenizer, self.tokenizer, cfg.reward.model_path, layout=cfg.reward.layout
            )
            if route.text is not None:  # chat prompts reach the RM as chats, as on the trainer ranks
                from tritonrlhf.engine.data import PromptDataset

                route.text.chats = PromptDataset(cfg.data, self.tokenizer, seed=cfg.seed).chats
        self.ref, self.reward = build_scoring(cfg, hello["policy_dir"], dtype, device, route)
        self.temperature = cfg.rollout.temperature

    def score(self, samples: list) -> None:
        """Fill each sample's ``ref_logprobs`` (with a reference), ``score`` and ``score_valid`` in place."""
        from tritonrlhf.engine.rl.experience import Experience, collate_samples

        if not samples:
            return
        rb = collate_samples(samples, self.tokenizer, self.tokenizer.pad_token_id)
        pending = self.reward.submit(  # a reward pool works while the reference runs
            rb.prompts, rb.responses, rb.sequences, rb.attention_mask, rb.finish_reasons, rb.columns
        )
        exp = Experience(rb.sequences, rb.attention_mask, rb.action_mask)
        ref = None if self.ref is None else self.ref.logprobs(exp, self.temperature).float().cpu()
        if ref is not None:
            for i, s in enumerate(samples):
                s.ref_logprobs = ref[i, : len(s.response_ids)].tolist()
        pending.result().set_on(samples)


def _event(phase: str, t0: float, t1: float, tag: int, **extra: float) -> dict[str, Any]:
    return {"phase": phase, "t0": t0, "t1": t1, "tag": tag, **extra}


class RemoteRollout:
    """Trainer 0's handle on the rollout ranks: requests out, samples and timelines back.

    A batch's prompts are cut into contiguous chunks, one per rollout rank; request ``j`` of the
    batch (prompt-major, ``n`` per prompt) gets seed ``seed + j`` on whichever rank serves it,
    so the samples do not depend on how many rollout ranks there are (nor on ``colocate`` vs
    ``split``).
    """

    def __init__(self, placement: Placement, hello: dict[str, Any]) -> None:
        self.placement = placement
        self.out = [placement.to_rollout(i) for i in range(placement.num_rollout)]
        self.inbox = [placement.from_rollout(i) for i in range(placement.num_rollout)]
        self.outstanding: list[int] = []  # requested batches not yet received, in request order
        self.received: dict[int, tuple[list, list[dict[str, Any]]]] = {}
        for ch in self.out:
            ch.send({"kind": "hello", **hello})

    def wait_ready(self, startup_timeout_s: float) -> None:
        """Wait for every rollout rank's first message (its vLLM engine is up), at most
        ``startup_timeout_s`` each: start-up takes longer than any later exchange."""
        for ch in self.inbox:
            ch.recv(timeout_s=startup_timeout_s, key="placement.startup_timeout_s")

    def request(self, batch: int, prompts: PromptBatch, n: int, seed: int) -> None:
        """Ask for ``n`` samples of each prompt; the records' columns travel with them, so the rollout
        ranks' reward functions (``placement.scoring=rollout``) get them too."""
        ids, columns = prompts.input_ids, prompts.columns
        k = len(self.out)
        bounds = [len(ids) * j // k for j in range(k + 1)]
        self.outstanding.append(batch)
        for j, ch in enumerate(self.out):
            lo, hi = bounds[j], bounds[j + 1]
            ch.send(
                {
                    "kind": "generate",
                    "batch": batch,
                    "prompts": ids[lo:hi],
                    "columns": columns[lo:hi],
                    "n": n,
                    "seed": seed + lo * n,
                }
            )

    def _receive_next(self) -> None:
        batch = self.outstanding.pop(0)
        samples, events = [], []
        for j, ch in enumerate(self.inbox):
            msg = ch.recv()
            if msg.get("batch") != batch:
                raise RuntimeError(f"rollout rank {j} answered batch {msg.get('batch')}, expected {batch}")
            samples += msg["samples"]
            events += [{**e, "role": f"rollout{j}"} for e in msg["events"]]
        self.received[batch] = (samples, events)

    def collect(self, batch: int) -> tuple[list, list[dict[str, Any]]]:
        """The samples of ``batch`` in request order, and the rollout ranks' events that came with them."""
        while batch not in self.received:
            if batch not in self.outstanding:
                raise RuntimeError(f"batch {batch} was never requested")
            self._receive_next()
        return self.received.pop(batch)

    def drain(self) -> None:
        """Wait until the rollout ranks have answered every request (before a weight sync, which
        they would only join after finishing them anyway), keeping the answers for ``collect``."""
        while self.outstanding:
            self._receive_next()

    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """Rollout rank 0's log-probs of a fixed sequence (call with no batch outstanding)."""
        if self.outstanding:
            raise RuntimeError("sequence_logprobs with generate requests outstanding; drain() first")
        self.out[0].send({"kind": "probe", "prompt": list(prompt_ids), "response": list(response_ids)})
        return self.inbox[0].recv()["logprobs"]

    def close(self) -> None:
        for ch in self.out:
            try:
                ch.send({"kind": "stop"})
            except Exception:  # the store host is this process; a dead peer needs no stop
                pass
