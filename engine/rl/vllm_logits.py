"""The banned-text constraint (:mod:`tritonrlhf.engine.rl.constraints`) as a vLLM V1 logits processor.

Imported only where vLLM runs (it subclasses vLLM's classes). ``VLLMRollout`` passes
:class:`BanLogitsProcessor` to ``LLM(logits_processors=[...])``; a request opts in with
``SamplingParams(extra_args={"banned_text": {"strings": [...], "patterns": [...], "tag": str}})``.

Where it runs in vLLM 0.32's sampler (``vllm/v1/sample/sampler.py``): custom processors that are
not argmax-invariant (a ban changes the argmax) run in ``apply_logits_processors`` on the fp32
logits, before penalties, temperature, top-k/top-p and the ``processed_logprobs`` computation;
so the log-probs vLLM returns are those of the masked, renormalised distribution, and
``-inf / T`` stays ``-inf``. The per-request state is the request's live list of output ids,
which vLLM keeps current (also under async scheduling) before it calls the processors.

With a ``tag``, the processor records :func:`~engine.rl.constraints.kept_logmass` of every step in
:data:`KEPT_LOGMASS` (``tag -> {position: value}``), which the rollout pops after ``generate``.
That side channel only exists in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as ``VLLMRollout``
runs); elsewhere the table stays empty and the rollout reports no kept mass.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from tritonrlhf.engine.rl.constraints import banned_text_for, kept_logmass

KEPT_LOGMASS: dict[str, dict[int, float]] = {}


class BanLogitsProcessor(AdapterLogitsProcessor):
    """Masks the tokens that would complete banned text to ``-inf`` (not argmax-invariant)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self.tokenizer_path = vllm_config.model_config.tokenizer

    def is_argmax_invariant(self) -> bool:
        return False

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        spec = (sampling_params.extra_args or {}).get("banned_text")
        if spec is not None and not (isinstance(spec, dict) and set(spec) <= {"strings", "patterns", "tag"}):
            raise ValueError(
                f"extra_args['banned_text'] must be a dict of strings/patterns/tag, got {spec!r}"
            )

    def new_req_logits_processor(self, params: SamplingParams):
        spec = (params.extra_args or {}).get("banned_text")
        if not spec or not (spec.get("strings") or spec.get("patterns")):
            return None
        ban = banned_text_for(
            self.tokenizer_path, tuple(spec.get("strings", ())), tuple(spec.get("patterns", ()))
        )
        record = KEPT_LOGMASS.setdefault(spec["tag"], {}) if spec.get("tag") else None
        temperature = params.temperature

        def apply(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            mask = ban.banned_mask(output_ids, logits.shape[-1]).to(logits.device)
            if record is not None:
                record[len(output_ids)] = float(kept_logmass(logits, mask, temperature))
            return logits.masked_fill(mask, float("-inf"))

        return apply


def pop_kept_logmass(params: SamplingParams, length: int) -> list[float] | None:
    """The kept-mass record of the request ``params`` tagged, removed from :data:`KEPT_LOGMASS`:
    ``length`` values, or None (no bans, or no side channel: not in-process)."""
    spec = (params.extra_args or {}).get("banned_text")
    if not spec or not spec.get("tag"):
        return None
    record = KEPT_LOGMASS.pop(spec["tag"], {})
    return [record[i] for i in range(length)] if len(record) >= length else None
