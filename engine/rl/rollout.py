"""Rollout engines: sample responses and their log-probs from the current policy.

Two backends share one small interface, :class:`RolloutEngine`:

* :class:`VLLMRollout` -- a vLLM ``LLM`` kept **in-process** (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
  beside the trainer. Weights arrive from the trainer through :meth:`load_weights` (one call per
  bucket) and :meth:`finish_sync`; the engine is never restarted and nothing touches disk.
* :class:`~engine.rl.hf_rollout.HFRollout` -- transformers ``generate`` on an HF model, the
  fallback and the reference (its own module).

Coexisting with DeepSpeed (``colocate`` placement)
--------------------------------------------------
Under ``deepspeed --num_gpus N`` torch.distributed is already initialised (world N) before the
rollout engine is built, and every rank builds its own engine. What vLLM 0.32 does then (read
from ``vllm/distributed/parallel_state.py`` and checked with 2 ranks on gloo):

* ``init_distributed_environment`` skips ``init_process_group`` when a default group exists and
  builds its WORLD group from *all* existing ranks. ``initialize_model_parallel`` lays ranks out
  as ``ExternalDP x DP x PP x PCP x TP``; with ``tensor_parallel_size=1`` every rank becomes its own
  TP group of one and an "external DP" replica -- exactly colocate placement. Generation issues no
  cross-rank collectives, so ranks may generate different numbers of prompts.
* The default ``uni`` executor also works on CPU, but it takes ``local_rank`` from the device
  string (``cuda`` -> 0), so on GPU every rank's engine would land on ``cuda:0``. The
  ``external_launcher`` executor (built for torchrun SPMD) reads ``RANK``/``LOCAL_RANK`` from the
  environment instead -- which the DeepSpeed launcher sets -- and forces in-process mode. So with
  world size > 1 we use ``distributed_executor_backend="external_launcher"``; with world size 1
  (plain ``python``) the default executor, which creates its own 1-process group.
* Building the engine creates process groups (``new_group`` is collective over the default
  group) and, with ``external_launcher``, all-reduces the KV budget: every rank must build its
  engine at the same point of the program. Only the constructor is collective.
* Not done: a fake world of 1 (rewriting ``RANK``/``WORLD_SIZE``): vLLM sizes its groups from the
  default group's ``get_world_size()``, not from those variables, so it would change nothing.

vLLM caps torch's intra-op threads at start-up ("Reducing Torch threads ... for serving") and
replaces ``torch.set_num_threads`` with a no-op on CPU; that would apply to the trainer in the same
process too, so :func:`keep_torch_threads` sets ``OMP_NUM_THREADS`` to the count torch had, unless
the user set it (then that count holds for both).

Log-probs
---------
``Sample.logprobs`` are the sampled tokens' log-probs under the *processed* distribution
(banned text masked, temperature, top-k, top-p applied), i.e. ``logprobs_mode="processed_logprobs"``.
:func:`processed_logprobs` is the one reference formula; the HF backend and both backends'
``sequence_logprobs`` use it.

Banned text (``rollout.banned_*``, :mod:`tritonrlhf.engine.rl.constraints`)
------------------------------------------------------------------
Both backends mask the tokens that would complete banned text to ``-inf`` before temperature,
top-k and top-p (vLLM: :mod:`tritonrlhf.engine.rl.vllm_logits`; HF: ``generate``'s ``logits_processor``), so
``Sample.logprobs`` are those of the renormalised, constrained (behaviour) distribution. The
trainer keeps the unconstrained policy, as it ignores top-k/top-p; PPO corrects with the truncated
importance weights ``min(pi_old / pi_rollout, async.tis_cap)``, which at a constrained step equal
the kept mass ``Z <= 1``. ``Sample.kept_logmass`` is ``log Z`` per token, so the trainer reports
``rollout/logprob_gap`` as ``|(rollout + kept_logmass) - trainer|`` (the engine mismatch alone, as
without bans) and ``rollout/constraint_kl`` as the mean ``-log Z`` = KL(constrained || unconstrained).

Top-k/top-p truncate the same way (after the ban): ``Sample.trunc_logmass`` is the log of the mass
they kept per token (:func:`truncation_logmass`; vLLM: ``vllm_logits.TruncationLogitsProcessor``,
registered when ``cfg`` truncates or ``truncation=True``), the gap adds it back too, and
``rollout/truncation_kl`` is its mean ``-log`` kept mass.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from tritonrlhf.engine.config import RolloutConfig


@dataclass
class Sample:
    """One sampled response.

    ``logprobs[i]`` is the log-prob of ``response_ids[i]`` under the processed sampling
    distribution; ``len(logprobs) == len(response_ids)``. ``finish_reason`` is ``"stop"`` (EOS,
    included in ``response_ids``) or ``"length"``. ``policy_version`` is the engine's
    weight version when the sample was drawn.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int
    # Filled where the sample is scored beside its rollout engine (split, placement.scoring=rollout):
    ref_logprobs: list[float] | None = None  # the frozen reference's log-probs of response_ids
    score: float | None = None  # the reward (0 when invalid)
    score_valid: bool = True  # False: non-finite or missing reward
    # With banned text (rollout.banned_*): log of the probability mass under softmax(logits / T)
    # the ban left at each step (0 where nothing was banned); None without bans.
    kept_logmass: list[float] | None = None
    # With top-k/top-p (rollout.top_k/top_p): log of the probability mass the truncation kept at each
    # step under the (banned) softmax(logits / T) (0 where nothing was cut); None without truncation.
    trunc_logmass: list[float] | None = None
    # The prompt record's other columns (answer, tests, ...), for reward functions; None: none.
    columns: dict[str, Any] | None = None
    # Set with score: each reward function's own score (reward.functions) and the per-sample info
    # a function returned (tritonrlhf.engine.rewards.RewardBatch), for the metrics and the samples log.
    reward_parts: dict[str, float] | None = None
    reward_info: dict[str, Any] | None = None


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout backend.

    A weight sync is ``load_weights`` once per bucket, then ``finish_sync(version)``; the engine
    must not generate between the two. Names are HF checkpoint names
    (``model.layers.0.self_attn.q_proj.weight``).
    """

    policy_version: int

    def generate(
        self, prompt_ids: list[list[int]], n: int = 1, seed: int | None = None
    ) -> list[list[Sample]]:
        """``n`` samples for each prompt; ``out[i][j]`` is sample ``j`` of prompt ``i``."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def finish_sync(self, version: int) -> None: ...

    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """Log-probs of a fixed ``response_ids`` after ``prompt_ids``, processed like sampling."""
        ...

    def sleep(self) -> None: ...
    def wake(self) -> None: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------- reference
def processed_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs of ``token_ids`` under ``softmax(logits / T)`` with ban/top-k/top-p masking.

    logits: ``[L, V]`` (any float dtype, computed in fp32); token_ids: ``[L]``; banned: optional
    bool ``[L, V]``, the tokens banned at each step (``BannedText.banned_masks``); returns ``[L]``
    fp32. Masking is :func:`processed_logits`'. Accepts log-probs as ``logits`` too (log_softmax
    is shift-invariant).
    """
    x = processed_logits(logits, temperature, top_k, top_p, banned)
    return x.log_softmax(-1).gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


def processed_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """``logits / T`` in fp32 with the banned, top-k and top-p tokens set to ``-inf``, in vLLM's
    sampler order (ban, temperature, top-k, top-p): what the sampler draws from, ``[..., V]``."""
    x = logits.float() / temperature
    if banned is not None:
        x = x.masked_fill(banned.to(x.device), float("-inf"))
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum <= 1.0 - top_p
        drop[..., -1] = False  # keep at least the most likely token
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x


def truncation_logmass(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log of the probability mass top-k/top-p keep under ``softmax(logits / T)`` (after the ban),
    ``<= 0``: ``[..., V] -> [...]`` fp32.

    The sampled token's processed log-prob (:func:`processed_logprobs`) minus this is its log-prob
    under the untruncated (but banned) distribution, and ``-truncation_logmass`` is the per-token
    KL(truncated || untruncated). 0 exactly where nothing is cut (top-k/top-p off, or a step whose
    nucleus is the whole support).
    """
    x = logits.float() / temperature
    if banned is not None:
        x = x.masked_fill(banned.to(x.device), float("-inf"))
    return processed_logits(x, 1.0, top_k, top_p).logsumexp(-1) - x.logsumexp(-1)


def truncates(cfg: Any) -> bool:
    """Whether ``cfg`` (a :class:`RolloutConfig`) samples with top-k or top-p truncation."""
    return 0 < cfg.top_k or cfg.top_p < 1.0


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def sample_seeds(base: int | None, fallback: torch.Generator, count: int) -> list[int]:
    """One seed per request so results do not depend on how vLLM batches them."""
    if base is None:
        base = int(torch.randint(0, 2**31 - 1, (1,), generator=fallback))
    return [base + i for i in range(count)]


def share_seed(base: int, rank: int, prompts_per_rank: int, n: int) -> int:
    """The seed of the first request of rank ``rank``'s contiguous share of a global batch whose
    request j (prompt-major, ``n`` per prompt) samples with ``base + j``: a sample's seed follows
    its global index, whatever the number of ranks."""
    return base + rank * prompts_per_rank * n


# --------------------------------------------------------------------------- vLLM
def keep_torch_threads() -> None:
    """Keep this process's torch intra-op threads when an in-process vLLM starts on CPU.

    Without ``OMP_NUM_THREADS`` in the environment, vLLM sets torch to one thread "for serving"
    and makes ``torch.set_num_threads`` a no-op; the trainer shares the process, so its forward
    and backward passes would run on one core (measured on 2 cores: the GRPO benchmark's train
    phase 0.39 s against 0.17 s, scoring 0.23 s against 0.11 s). Setting the variable to the
    current count keeps it; a value the user set is left alone.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


class VLLMRollout:
    """An in-process vLLM engine whose weights are replaced in place by the trainer.

    Build it on every rank at the same point of the program (the constructor is collective
    when torch.distributed is initialised, see the module docstring). ``dtype`` is vLLM's
    compute dtype; ``max_model_len`` bounds prompt + response.
    """

    def __init__(
        self,
        model_dir: str,
        cfg: RolloutConfig,
        seed: int,
        max_model_len: int,
        dtype: str = "float32",
        bans: bool | None = None,
        truncation: bool | None = None,
    ):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: tensors pass by reference
        gpu = _on_gpu()
        if not gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.kv_cache_gib)))  # whole GiB
            keep_torch_threads()
        from vllm import LLM

        kwargs: dict[str, Any] = {}
        # The ban processor runs on every decode step once registered: only where a request may
        # ban text (bans=None: cfg's own bans; a stage that swaps self.cfg passes True).
        self._bans_on = bool(cfg.banned_strings or cfg.banned_patterns) if bans is None else bans
        if self._bans_on:
            from tritonrlhf.engine.rl.vllm_logits import BanLogitsProcessor  # imports vllm

            kwargs["logits_processors"] = [BanLogitsProcessor]
        # Likewise the truncation recorder (Sample.trunc_logmass), where top-k/top-p may truncate.
        self._trunc_on = truncates(cfg) if truncation is None else truncation
        if self._trunc_on:
            from tritonrlhf.engine.rl.vllm_logits import TruncationLogitsProcessor  # imports vllm

            kwargs.setdefault("logits_processors", []).append(TruncationLogitsProcessor)
        shares_dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if shares_dist and torch.distributed.get_world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        if gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = cfg.sleep_during_train
        else:  # the CPU runner cannot rewind a seeded request's generator after a partial (chunked)
            # prefill ("CPU Generator does not use offset", > 4096 prompt tokens in one call): whole prompts
            kwargs |= {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}
        self.cfg = cfg
        self.policy_version = 0
        self._asleep = False
        self._reloading = False
        self._rng = torch.Generator().manual_seed(seed)
        self._requests = 0  # tags the requests' kept-mass (ban, truncation) records
        self.llm = LLM(
            model=model_dir,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=cfg.enforce_eager,
            logprobs_mode="processed_logprobs",
            max_logprobs=-1,  # sequence_logprobs at T != 1 needs the full prompt distribution
            tensor_parallel_size=1,
            **kwargs,
        )
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        # vLLM's engine shutdown (close, or GC of the LLM) destroys the *default* process group.
        # When the trainer owns that group (DeepSpeed), keep it: re-arm the in-process client's
        # finalizer so only vLLM's own groups are torn down.
        client = self.llm.llm_engine.engine_core
        self._finalizer = getattr(client, "_finalizer", None)
        if self._finalizer is not None and shares_dist:
            self._finalizer.detach()
            self._finalizer = weakref.finalize(client, _shutdown_core, client.engine_core, True)

    def _ban(self) -> Any:
        """The :class:`~engine.rl.constraints.BannedText` of ``cfg``'s bans (None without bans)."""
        from tritonrlhf.engine.rl.constraints import banned_text_for

        c = self.cfg
        if not (c.banned_strings or c.banned_patterns):
            return None
        tokenizer = self.llm.llm_engine.model_config.tokenizer
        return banned_text_for(tokenizer, tuple(c.banned_strings), tuple(c.banned_patterns))

    def _params(self, seed: int, **over: Any):
        from vllm import SamplingParams

        c = self.cfg
        if c.banned_strings or c.banned_patterns:
            if not self._bans_on:
                raise ValueError(
                    "rollout: this vLLM engine was built without the banned-text processor "
                    "(open it with bans=True to ban text in later requests)"
                )
            self._requests += 1
            tag = f"{id(self)}:{self._requests}"
            spec = {"strings": list(c.banned_strings), "patterns": list(c.banned_patterns), "tag": tag}
            over.setdefault("extra_args", {"banned_text": spec})
        if truncates(c) and self._trunc_on:
            self._requests += 1
            extra = over.setdefault("extra_args", {})
            if extra is not None:
                extra["truncation_tag"] = f"{id(self)}:{self._requests}"
        kw: dict[str, Any] = dict(
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            max_tokens=c.max_new_tokens,
            logprobs=0,
            seed=seed,
            detokenize=False,
        )
        kw.update(over)
        return SamplingParams(**kw)

    def generate(
        self, prompt_ids: list[list[int]], n: int = 1, seed: int | None = None
    ) -> list[list[Sample]]:
        from tritonrlhf.engine.rl.vllm_logits import pop_kept_logmass, pop_trunc_logmass

        self.wake()
        seeds = sample_seeds(seed, self._rng, len(prompt_ids) * n)
        requests = [{"prompt_token_ids": list(p)} for p in prompt_ids for _ in range(n)]
        params = [self._params(s) for s in seeds]
        outs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        samples = []
        for req, out, sp in zip(requests, outs, params):
            o = out.outputs[0]
            lps = [step[tok].logprob for step, tok in zip(o.logprobs, o.token_ids)]
            reason = "stop" if o.finish_reason == "stop" else "length"
            smp = Sample(req["prompt_token_ids"], list(o.token_ids), lps, reason, self.policy_version)
            smp.kept_logmass = pop_kept_logmass(sp, len(lps))
            smp.trunc_logmass = pop_trunc_logmass(sp, len(lps))
            samples.append(smp)
        return [samples[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """Prompt log-probs of ``prompt + response``, with temperature/top-k/top-p applied.

        vLLM's prompt log-probs skip the sampling processors (they are ``log_softmax(logits)``),
        so unless the config is plain T=1 sampling without bans we fetch the full distribution at
        each response position (``O(len * vocab)`` Python objects: a diagnostic, not a hot path)
        and apply :func:`processed_logprobs` to it, with the ban masks sampling used.
        """
        self.wake()
        c = self.cfg
        ban = self._ban()
        plain = c.temperature == 1.0 and c.top_k in (-1, 0) and c.top_p >= 1.0 and ban is None
        ids = list(prompt_ids) + list(response_ids)
        sp = self._params(
            0,
            max_tokens=1,
            temperature=1.0,
            top_k=-1,
            top_p=1.0,
            logprobs=None,
            prompt_logprobs=0 if plain else -1,
            extra_args=None,
        )
        out = self.llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
        positions = out.prompt_logprobs[len(prompt_ids) :]
        if plain:
            return [pos[tok].logprob for pos, tok in zip(positions, response_ids)]
        full = torch.full((len(response_ids), self.vocab_size), float("-inf"))
        for row, pos in enumerate(positions):
            full[row, list(pos)] = torch.tensor([lp.logprob for lp in pos.values()])
        banned = ban.banned_masks(response_ids, self.vocab_size) if ban is not None else None
        lps = processed_logprobs(full, torch.tensor(response_ids), c.temperature, c.top_k, c.top_p, banned)
        return lps.tolist()

    # -- weight sync ------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of HF-named tensors into the running model (no copy kept).

        The first call of a sync opens vLLM's layer-wise reload (the repacked CPU/quantised
        kernel tensors are kept and refilled in place); layers are processed as soon as all
        their weights have arrived, so a fused layer (qkv_proj, gate_up_proj) may span buckets.
        """
        self.wake()
        if not self._reloading:
            self.llm.collective_rpc(_worker_begin_reload)
            self._reloading = True
        self.llm.collective_rpc(_worker_load_weights, args=(list(named_tensors),))

    def finish_sync(self, version: int) -> None:
        """Close the reload, drop caches built from the old weights, stamp ``version``."""
        if self._reloading:
            self.llm.collective_rpc(_worker_finish_reload)
            self._reloading = False
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self.policy_version = version

    # -- memory -------------------------------------------------------------------------------
    def sleep(self) -> None:
        """GPU: offload weights and drop the KV cache while the trainer runs. CPU: no-op."""
        if _on_gpu() and self.cfg.sleep_during_train and not self._asleep:
            self.llm.reset_prefix_cache()
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down; the trainer's process group (if any) survives."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        if self._finalizer is not None:
            self._finalizer()  # runs once, then detaches
        else:
            llm.llm_engine.engine_core.shutdown()
        del llm


@contextmanager
def _default_group_kept():
    """Make ``destroy_process_group()`` of the default group a no-op (subgroups still go)."""
    dist = torch.distributed
    original = dist.destroy_process_group

    def guarded(group=None):
        if group is not None:
            original(group)

    dist.destroy_process_group = guarded
    try:
        yield
    finally:
        dist.destroy_process_group = original


def _shutdown_core(engine_core: Any, keep_default_group: bool) -> None:
    with _default_group_kept() if keep_default_group else nullcontext():
        engine_core.shutdown()


# Worker-side steps, run through ``collective_rpc`` (in-process: a direct call, tensors by
# reference). They mirror vllm.model_executor.model_loader.reload.inplace.reload_weights,
# split so that one reload can span several buckets.
def _worker_begin_reload(worker: Any) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(worker.model_runner.get_model())


def _worker_load_weights(worker: Any, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        worker.model_runner.get_model().load_weights(iter(named_tensors))


def _worker_finish_reload(worker: Any) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    runner = worker.model_runner
    model = runner.get_model()
    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(model, worker.vllm_config.model_config)
        _refresh_tied_lm_head(model)
    for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
        getattr(runner, reset, lambda: None)()


def _refresh_tied_lm_head(model: torch.nn.Module) -> None:
    """Re-derive a tied LM head's kernel state from the (just reloaded) input embedding.

    With ``tie_word_embeddings`` vLLM's ``lm_head.weight`` is the embedding's parameter, and the
    model's ``load_weights`` skips ``lm_head.*``. The layer-wise reload refills the shared
    parameter through the embedding but leaves the head "not loaded", so on CPU the head keeps
    the packed GEMM weight (``cpu_linear``) built from the *old* values: sampling then used the
    old head with the new body (measured: |vLLM - trainer| log-prob gap 0.08-0.26 after each
    swap on a tied Qwen2). Running the head's ``process_weights_after_loading`` again repacks it
    from the current values; on GPU it is a no-op for unquantized heads.
    """
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None:
        return
    tied = any(m is not head and getattr(m, "weight", None) is weight for m in model.modules())
    method = getattr(head, "quant_method", None)
    if tied and method is not None:
        method.process_weights_after_loading(head)
