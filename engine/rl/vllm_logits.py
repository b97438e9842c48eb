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

:class:`TruncationLogitsProcessor` records, the same way (:data:`TRUNC_LOGMASS`, opted in with
``extra_args={"truncation_tag": str}``), :func:`~engine.rl.rollout.truncation_logmass`: the log of
the mass top-k/top-p keep at each step. It is argmax-invariant (it returns the logits unchanged),
so vLLM runs it after temperature and before top-k/top-p, on exactly the logits the sampler
truncates, and skips it for greedy requests. Cost per decode step, only while a request records:
one batched top-k and sort over the vocabulary for the recording rows (what the sampler's own
top-k/top-p does once more), no host sync (values stay tensors until the rollout pops them).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from tritonrlhf.engine.rl.constraints import banned_text_for, kept_logmass
from tritonrlhf.engine.rl.rollout import truncation_logmass

KEPT_LOGMASS: dict[str, dict[int, float]] = {}
TRUNC_LOGMASS: dict[str, dict[int, torch.Tensor]] = {}


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


class TruncationLogitsProcessor(LogitsProcessor):
    """Records each tagged request's :func:`~engine.rl.rollout.truncation_logmass` per step; leaves
    the logits as they are. Rows are grouped by (top_k, top_p), one batched call per group."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        # batch row -> (record, top_k, top_p, the request's live output ids)
        self.rows: dict[int, tuple[dict[int, torch.Tensor], int, float, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return True

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        tag = (sampling_params.extra_args or {}).get("truncation_tag")
        if tag is not None and not isinstance(tag, str):
            raise ValueError(f"extra_args['truncation_tag'] must be a string, got {tag!r}")

    @staticmethod
    def _new_state(params: SamplingParams, prompt_ids: Any, output_ids: list[int]):
        tag = (params.extra_args or {}).get("truncation_tag")
        if not tag:
            return None
        return TRUNC_LOGMASS.setdefault(tag, {}), params.top_k, params.top_p, output_ids

    def update_state(self, batch_update: Any) -> None:
        process_dict_updates(self.rows, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        groups: dict[tuple[int, float], list[int]] = {}
        for row, (_, k, p, _) in self.rows.items():
            groups.setdefault((k, p), []).append(row)
        for (k, p), rows in groups.items():
            # The logits are already divided by the temperature here.
            mass = truncation_logmass(logits[rows], 1.0, k, p)
            for i, row in enumerate(rows):
                record, _, _, out = self.rows[row]
                record[len(out)] = mass[i]
        return logits


def pop_trunc_logmass(params: SamplingParams, length: int) -> list[float] | None:
    """The truncation record of the request ``params`` tagged, removed from :data:`TRUNC_LOGMASS`:
    ``length`` values, or None (untagged, greedy, or not in-process)."""
    tag = (params.extra_args or {}).get("truncation_tag")
    if not tag:
        return None
    record = TRUNC_LOGMASS.pop(tag, {})
    if len(record) < length:
        return None
    return torch.stack([record[i] for i in range(length)]).float().cpu().tolist() if length else []
