"""One rollout engine serving several policy checkpoints in turn (eval, red teaming).

``PolicySampler.sample(path, model, prompt_ids, seed)`` points the engine at ``model`` and draws
one sample per prompt. With vLLM the engine is built from the first policy and each later
policy's weights are swapped into it (``load_weights`` + ``finish_sync``) instead of building
another ``LLM`` in-process; a policy of another architecture gets a fresh engine. With
``rollout.backend=hf`` the HF model itself generates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_ARCH_KEYS = (
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


def same_path(a: str | Path, b: str | Path) -> bool:
    return bool(a) and bool(b) and Path(a).resolve() == Path(b).resolve()


def arch_of(config: Any) -> tuple:
    """What must match for one policy's weights to be swapped into an engine built for another."""
    return tuple(repr(getattr(config, k, None)) for k in _ARCH_KEYS)


class PolicySampler:
    """The rollout engine of an eval-style run; ``max_prompt_len`` sizes vLLM's context."""

    def __init__(self, rollout_cfg: Any, tokenizer: Any, seed: int, max_prompt_len: int) -> None:
        self.rcfg, self.tok, self.seed, self.max_prompt_len = rollout_cfg, tokenizer, seed, max_prompt_len
        self.rollout: Any = None
        self._engine_arch: tuple | None = None
        self._loaded = ""  # the checkpoint whose weights the engine holds
        self._version = 0

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.close()
            self.rollout = None

    def point_at(self, path: str, model: Any) -> None:
        """Make the rollout engine generate from ``model`` (whose checkpoint is ``path``)."""
        if self.rollout is not None and self._loaded and same_path(self._loaded, path):
            return
        if self.rcfg.backend != "vllm":
            from tritonrlhf.engine.rl.hf_rollout import HFRollout

            if self.rollout is None:
                self.rollout = HFRollout(model, self.tok, self.rcfg)
            self.rollout.model = model
        elif self.rollout is None or self._engine_arch != arch_of(model.config):
            from tritonrlhf.engine.rl.rollout import VLLMRollout

            self.close()
            max_len = self.max_prompt_len + self.rcfg.max_new_tokens + 1
            self.rollout = VLLMRollout(str(path), self.rcfg, self.seed, max_len, "float32")
            self._engine_arch = arch_of(model.config)
        else:
            self._version += 1
            self.rollout.load_weights(list(model.named_parameters()))
            self.rollout.finish_sync(self._version)
        self._loaded = str(path)

    def sample(
        self, path: str, model: Any, prompt_ids: list[list[int]], seed: int
    ) -> tuple[list[Any], Any, list[str]]:
        """(samples, packed batch, decoded responses): one sample per prompt at ``seed``."""
        from tritonrlhf.engine.stages.dpo import pack_rows

        self.point_at(path, model)
        samples = [g[0] for g in self.rollout.generate(prompt_ids, n=1, seed=seed)]
        ids = [s.response_ids for s in samples]
        batch = pack_rows(prompt_ids, ids, self.tok.pad_token_id)
        return samples, batch, self.tok.batch_decode(ids, skip_special_tokens=True)
