"""Building a rollout engine: :func:`open_rollout`, for the trainer (colocate), the rollout ranks
(split) and the offline stages (best-of-n, eval, red teaming, revision)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def open_rollout(
    path: str | Path,
    rollout_cfg: Any,
    tokenizer: Any,
    seed: int,
    max_model_len: int,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    role: str = "model.path",
    device: torch.device | None = None,
    bans: bool | None = None,
) -> Any:
    """A rollout engine on the checkpoint at ``path``, in ``dtype``: vLLM in-process
    (:class:`~engine.rl.rollout.VLLMRollout`), or HF ``generate`` on its own copy of the model
    (:class:`~engine.rl.hf_rollout.HFRollout`), as ``rollout_cfg.backend`` says.

    ``bans``: whether requests may carry banned text (vLLM registers its ban processor only then);
    None: whether ``rollout_cfg`` bans anything. A caller that swaps the engine's config between
    calls (revision) says True when any of its configs does. ``device``: the HF model's (default
    the current CUDA device, else CPU).
    """
    if rollout_cfg.backend == "vllm":
        from tritonrlhf.engine.rl.rollout import VLLMRollout

        vdtype = str(dtype).removeprefix("torch.")
        return VLLMRollout(str(path), rollout_cfg, seed, max_model_len, vdtype, bans=bans)
    from tritonrlhf.engine.models import load_causal_lm
    from tritonrlhf.engine.rl.hf_rollout import HFRollout

    if device is None:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    lm = load_causal_lm(path, dtype, attn_implementation, device, role=role).to(device)
    return HFRollout(lm, tokenizer, rollout_cfg)
