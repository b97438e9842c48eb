"""The HF rollout backend: transformers ``generate`` on an HF model, with the same
:class:`~engine.rl.rollout.Sample` output and sampling semantics as :class:`~engine.rl.rollout.VLLMRollout`
(see ``engine/rl/rollout.py``): the fallback where vLLM is absent, and the reference."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tritonrlhf.engine.config import RolloutConfig
from tritonrlhf.engine.rl.rollout import (
    Sample,
    processed_logits,
    processed_logprobs,
    sample_seeds,
    truncates,
    truncation_logmass,
)


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The ids vLLM stops on: the tokenizer's EOS, then the ``eos_token_id`` (an int or a list) of
    the checkpoint's generation config (vLLM's ``update_from_generation_config``), in that order."""
    ids: list[int] = []
    extra = getattr(generation_config, "eos_token_id", None)
    for tid in [tokenizer.eos_token_id, *(extra if isinstance(extra, (list, tuple)) else [extra])]:
        if tid is not None and int(tid) not in ids:
            ids.append(int(tid))
    return ids


class HFRollout:
    """transformers ``generate`` with the same :class:`Sample` output (no vLLM needed).

    ``model`` may be the trainer's own module (then ``load_weights`` copies onto itself, which is
    harmless). Sampling is exactly ``softmax(logits / T)`` with ``rollout.top_k`` / ``top_p``, as in
    vLLM: whatever the checkpoint's ``generation_config`` carries (repetition_penalty,
    no_repeat_ngram_size, bad_words_ids, min_length, its own temperature/top-k/top-p, beams, ...)
    is not applied, because ``generate`` runs against a blank generation config. It stops on the
    same ids as vLLM (:func:`stop_token_ids`: the tokenizer's EOS and the generation config's
    ``eos_token_id`` list). Log-probs are those of the scores ``generate`` actually sampled from.
    Banned text (``rollout.banned_*``) is masked by an :class:`~engine.rl.constraints.HFBanProcessor`.

    ``rollout.hf_decode``: ``auto`` decodes Llama-family models with the static-cache loop of
    :mod:`tritonrlhf.engine.rl.static_decode` (the same sampling from the same distribution, checked against
    the model's forward at construction) and any other model with ``generate``; ``static``
    refuses a model the loop can't run; ``generate`` always uses ``generate``. One line says
    which at construction.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: RolloutConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.model = model  # builds the decoder (see the setter)
        self.policy_version = 0
        self._rng = torch.Generator().manual_seed(0)
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._bans: dict[tuple, Any] = {}

    @property
    def model(self) -> Any:
        return self._model

    @model.setter
    def model(self, model: Any) -> None:
        """Point the engine at another model (the eval stage swaps policy and baseline): the
        static-cache decoder is rebuilt (and re-checked) for it; the same model keeps its decoder
        (which reads the weights at each call)."""
        if model is not None and model is getattr(self, "_model", None):
            return
        self._model = model
        self.decoder = None if model is None else self._static_decoder(getattr(self.cfg, "hf_decode", "auto"))

    def _static_decoder(self, mode: str) -> Any:
        """The :class:`~engine.rl.static_decode.StaticDecoder` for ``rollout.hf_decode`` (None: generate)."""
        from tritonrlhf.engine.rl.static_decode import StaticDecoder, unsupported

        name = type(self.model).__name__
        if mode == "generate":
            print(
                f"[rollout] HF backend: {name} decodes with transformers generate (rollout.hf_decode=generate)"
            )
            return None
        why = unsupported(self.model)
        decoder = None
        if why is None:
            try:
                decoder = StaticDecoder(self.model)
            except ValueError as e:
                why = str(e)
        if decoder is None:
            if mode == "static":
                raise ValueError(
                    f"rollout.hf_decode=static: the static-cache decoder can't run {name}: {why}"
                )
            print(f"[rollout] HF backend: {name} decodes with transformers generate ({why})", flush=True)
            return None
        print(f"[rollout] HF backend: {name} decodes with the static-cache loop", flush=True)
        return decoder

    def _ban(self) -> Any:
        """The :class:`~engine.rl.constraints.BannedText` of ``cfg``'s bans (None without bans)."""
        from tritonrlhf.engine.rl.constraints import BannedText

        key = (tuple(self.cfg.banned_strings), tuple(self.cfg.banned_patterns))
        if not any(key):
            return None
        if key not in self._bans:
            self._bans[key] = BannedText(self.tokenizer, *key)
        return self._bans[key]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generation_config(self) -> Any:
        from transformers import GenerationConfig

        c = self.cfg
        return GenerationConfig(
            do_sample=True,
            num_beams=1,
            temperature=c.temperature,
            top_k=c.top_k if c.top_k > 0 else 0,  # 0, not None: None would mean transformers' 50
            top_p=c.top_p,
            max_new_tokens=c.max_new_tokens,
            eos_token_id=self.stop_ids or None,
            pad_token_id=self.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], n: int = 1, seed: int | None = None
    ) -> list[list[Sample]]:
        flat = [list(p) for p in prompt_ids for _ in range(n)]
        seeds = sample_seeds(seed, self._rng, max(len(flat), 1))  # request i: seed + i, as in vLLM
        if not flat:
            return [[] for _ in prompt_ids]
        width = max(map(len, flat))
        dev = self._device()
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in flat], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in flat], device=dev)
        was_training = self.model.training
        self.model.eval()
        try:
            if self.decoder is not None and self.decoder.fits(width + self.cfg.max_new_tokens):
                new, lps, kept, trunc = self._static_generate(ids, mask, seeds)
            else:
                new, lps, kept, trunc = self._hf_generate(ids, mask, seeds[0])
        finally:
            self.model.train(was_training)
        return self._samples(flat, n, new, lps, kept, trunc)

    def _hf_generate(
        self, ids: torch.Tensor, mask: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """transformers ``generate``: (tokens [B, T], log-probs [B, T], kept log-mass [B, T] or None,
        truncation log-mass [B, T] or None)."""
        from transformers import GenerationConfig, LogitsProcessorList

        from tritonrlhf.engine.rl.constraints import HFBanProcessor

        dev, width = ids.device, ids.shape[1]
        # generate() fills every field left None from model.generation_config (the checkpoint's
        # defaults): blank it for the call, so only what _generation_config() sets applies.
        saved = getattr(self.model, "generation_config", None)
        self.model.generation_config = GenerationConfig()
        ban = self._ban()
        procs = [HFBanProcessor(ban, width, self.stop_ids, self.cfg.temperature)] if ban is not None else []
        # Custom processors run before generate's temperature/top-k/top-p warpers: this one sees the
        # banned logits the warpers truncate.
        trunc = _TruncationRecorder(self.cfg) if truncates(self.cfg) else None
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(seed)
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=self._generation_config(),
                    logits_processor=LogitsProcessorList(procs + ([trunc] if trunc else [])),
                )
        finally:
            self.model.generation_config = saved
        new = out.sequences[:, width:]
        # Scores are the logits after the processors generate sampled with (ban, T, top-k, top-p).
        scores = torch.stack(out.scores, dim=1)  # [B, T, V]
        lps = processed_logprobs(scores, new)
        kept = torch.stack(procs[0].kept, dim=1) if procs else None  # [B, T]
        return new, lps, kept, torch.stack(trunc.mass, dim=1) if trunc else None

    def _static_generate(
        self, ids: torch.Tensor, mask: torch.Tensor, seeds: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The static-cache loop: (tokens [B, T], log-probs [B, T], kept and truncation log-mass
        [B, T] or None). Row i draws from its own generator seeded with ``seeds[i]``."""
        from tritonrlhf.engine.rl.constraints import HFBanProcessor

        c, width = self.cfg, ids.shape[1]
        gens = [torch.Generator(device=ids.device).manual_seed(s) for s in seeds]
        ban = self._ban()
        proc = HFBanProcessor(ban, width, self.stop_ids, c.temperature) if ban is not None else None
        kept = torch.zeros(ids.shape[0], c.max_new_tokens) if proc is not None else None
        trunc = torch.zeros(ids.shape[0], c.max_new_tokens, device=ids.device) if truncates(c) else None

        def choose(
            logits: torch.Tensor, rows: torch.Tensor, t: int, tokens: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if proc is not None:  # the ban reads the live rows' text so far
                logits = proc(torch.cat([ids[rows], tokens[rows, :t]], dim=1), logits)
                kept[rows.cpu(), t] = proc.kept[-1]
            lp = processed_logits(logits, c.temperature, c.top_k, c.top_p).log_softmax(-1)
            if trunc is not None:
                trunc[rows, t] = truncation_logmass(logits, c.temperature, c.top_k, c.top_p)
            # The exponential race (argmax p / E, E ~ Exp(1)) on noise from each row's own generator:
            # a row's draws depend on its seed and the step only, not on which other rows share the
            # call or have stopped, so a batch cut between ranks samples what it samples whole.
            V = lp.shape[-1]
            noise = torch.stack(
                [torch.empty(V, device=lp.device).exponential_(generator=gens[r]) for r in rows.tolist()]
            )
            tok = (lp.exp() / noise).argmax(-1)
            return tok, lp.gather(-1, tok[:, None])[:, 0]

        step = self._decode_step(ids.device)
        try:
            new, lps = self.decoder.generate(
                ids, mask, c.max_new_tokens, choose, self.stop_ids, self.pad_id, step=step
            )
        except RuntimeError as e:
            if step != "graph" or getattr(c, "cuda_graph", "auto") != "auto":
                raise
            self._graph_failed = f"its capture failed ({type(e).__name__}: {str(e)[:200]})"
            return self._static_generate(ids, mask, seeds)  # again, eagerly, from the same seeds
        cut = new.shape[1]
        return new, lps, *(x[:, :cut].cpu() if x is not None else None for x in (kept, trunc))

    def _decode_step(self, device: torch.device) -> str:
        """The static loop's step for ``rollout.cuda_graph`` on ``device`` (``graph`` or ``loop``);
        prints a line whenever the choice changes, with the reason."""
        from tritonrlhf.engine.rl.static_decode import decode_step

        step, why = decode_step(getattr(self.cfg, "cuda_graph", "auto"), device)
        failed = getattr(self, "_graph_failed", None)
        if step == "graph" and failed:
            step, why = "loop", f"the CUDA graph is off: {failed}"
        if (step, why) != getattr(self, "_step_note", None):
            self._step_note = (step, why)
            how = "as a CUDA graph" if step == "graph" else "eagerly"
            print(f"[rollout] HF backend: the static-cache decode step runs {how} ({why})", flush=True)
        return step

    def _samples(
        self,
        flat: list[list[int]],
        n: int,
        new: torch.Tensor,
        lps: torch.Tensor,
        kept: torch.Tensor | None,
        trunc: torch.Tensor | None = None,
    ) -> list[list[Sample]]:
        """Per prompt, its ``n`` samples from the generated ``new`` tokens [B, T], their log-probs,
        kept and truncation log-mass (each cut after the row's first stop token)."""
        stops = set(self.stop_ids)
        samples = []
        for i, p in enumerate(flat):
            resp = new[i].tolist()
            end = next((k for k, t in enumerate(resp) if t in stops), None)
            length = len(resp) if end is None else end + 1
            samples.append(
                Sample(
                    p,
                    resp[:length],
                    lps[i, :length].tolist(),
                    "length" if end is None else "stop",
                    self.policy_version,
                    kept_logmass=kept[i, :length].tolist() if kept is not None else None,
                    trunc_logmass=trunc[i, :length].tolist() if trunc is not None else None,
                )
            )
        return [samples[i * n : (i + 1) * n] for i in range(len(flat) // n)]

    @torch.no_grad()
    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        c = self.cfg
        ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=self._device())
        logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
        ban = self._ban()
        banned = ban.banned_masks(response_ids, logits.shape[-1]) if ban is not None else None
        lps = processed_logprobs(logits, ids[0, len(prompt_ids) :], c.temperature, c.top_k, c.top_p, banned)
        return lps.tolist()

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, t in named_tensors:
            if params[name].data_ptr() != t.data_ptr():
                params[name].copy_(t)

    def finish_sync(self, version: int) -> None:
        self.policy_version = version

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        self.model = None


class _TruncationRecorder:
    """A pass-through transformers logits processor that collects
    :func:`~engine.rl.rollout.truncation_logmass` per step as ``[B]`` tensors (in ``mass``)."""

    def __init__(self, cfg: RolloutConfig):
        self.cfg = cfg
        self.mass: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        self.mass.append(truncation_logmass(scores, c.temperature, c.top_k, c.top_p).cpu())
        return scores
