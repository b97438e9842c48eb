"""The eval stage: a policy checkpoint on held-out prompts, and a reward model on preference pairs.

For the policy (``models.policy``), with one sample per prompt at ``rollout.temperature``:

* ``rm_reward`` / ``gold_reward``: mean reward-model score and mean gold score (``models.gold``,
  a ``module:function`` such as ``engine.demo_task:gold_reward``) of its samples;
* ``win_rate_rm`` / ``win_rate_gold`` against ``models.baseline`` (the SFT policy): the
  baseline answers the same prompts; a win counts 1, a tie 1/2 (``win_rate``);
* ``kl``: mean sequence KL to ``models.reference`` (default: the baseline), estimated on the
  policy's own samples as ``sum_t logπ(y_t) - logπ_ref(y_t)`` (``sequence_kl``), both
  log-probs from ``PolicyLogprobs`` at the sampling temperature. It is an unbiased estimate of
  KL(π_T || π_ref,T) because the samples come from π_T (T = ``rollout.temperature``);
* ``response_len``: mean response tokens (incl. <eos>), policy and baseline.

For a reward model (``models.reward_model``) and ``data.pairs``: ``rm_accuracy``, the fraction
of pairs with ``r(chosen) > r(rejected)`` strictly (``pairwise_accuracy``); identical pairs are
dropped and counted.

Generation: one rollout engine. With vLLM the baseline's weights are swapped into the same
engine (``load_weights`` + ``finish_sync``) instead of building a second ``LLM`` in-process.
Rank 0 does the work; other ranks (under ``deepspeed``) wait. The result is returned and
written to ``<output_dir>/eval.json``; per-prompt rows go to ``eval_samples.jsonl``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import distributed as D
from engine.config import ConfigError, RolloutConfig, StageConfig, _choice, load_config, save_config


# --------------------------------------------------------------------------- config
@dataclass
class EvalModelsConfig:
    policy: str = ""  # causal-LM checkpoint to evaluate; empty: RM accuracy only
    baseline: str = "runs/sft"  # win rates against this policy; empty: none
    reference: str = ""  # KL reference; empty: the baseline
    reward_model: str = ""  # sequence-classification RM; empty: no RM metrics
    gold: str = ""  # reward callable module:function, e.g. engine.demo_task:gold_reward
    tokenizer: str = ""  # empty: the policy's (or baseline's / RM's) own


@dataclass
class EvalDataConfig:
    prompts: str = "data/demo/eval_prompts.jsonl"  # JSONL with "prompt", or "toy"
    num_prompts: int = 0  # first N prompts; 0: all
    max_prompt_len: int = 64
    pairs: str = ""  # preference JSONL for RM accuracy; empty: none
    pairs_max_len: int = 64
    pairs_max_prompt_len: int = 48


@dataclass
class EvalRolloutConfig(RolloutConfig):
    max_new_tokens: int = 16


@dataclass
class EvalConfig(StageConfig):
    output_dir: str = "runs/eval"
    models: EvalModelsConfig = field(default_factory=EvalModelsConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    rollout: EvalRolloutConfig = field(default_factory=EvalRolloutConfig)

    def validate(self, world_size: int = 1) -> None:
        m, d = self.models, self.data
        _choice("rollout.backend", self.rollout.backend, ("vllm", "hf"))
        if not m.policy and not (m.reward_model and d.pairs):
            raise ConfigError(
                "nothing to evaluate: set models.policy, or models.reward_model with data.pairs"
            )
        if self.rollout.temperature <= 0:
            raise ConfigError(f"rollout.temperature must be > 0, got {self.rollout.temperature}")
        if d.num_prompts < 0:
            raise ConfigError(f"data.num_prompts must be >= 0, got {d.num_prompts}")
        paths = [(f"models.{k}", getattr(m, k)) for k in ("policy", "baseline", "reference", "reward_model")]
        paths += [("models.tokenizer", m.tokenizer), ("data.pairs", d.pairs)]
        if m.policy and d.prompts != "toy":
            paths.append(("data.prompts", d.prompts))
        for key, path in paths:
            if path and not Path(path).exists():
                raise ConfigError(f"{key}: path does not exist: {path}")


# --------------------------------------------------------------------------- pure functions
def win_rate(a_scores: torch.Tensor, b_scores: torch.Tensor) -> float:
    """Fraction of items where ``a`` beats ``b`` ([N] each), ties counting 1/2."""
    a, b = torch.as_tensor(a_scores, dtype=torch.float64), torch.as_tensor(b_scores, dtype=torch.float64)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"win_rate: need two non-empty score lists of one length, got {a.shape} and {b.shape}"
        )
    return float(((a > b).double() + 0.5 * (a == b).double()).mean())


def sequence_kl(
    policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, action_mask: torch.Tensor
) -> torch.Tensor:
    """[B] per-sequence KL estimate ``sum_t mask * (logπ - logπ_ref)`` from [B, R] sampled-token log-probs."""
    m = action_mask.to(policy_logprobs.dtype)
    return ((policy_logprobs - ref_logprobs) * m).sum(-1)


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Fraction of pairs with ``chosen > rejected`` (strictly: a tie is a miss)."""
    c, r = torch.as_tensor(chosen_scores), torch.as_tensor(rejected_scores)
    if c.shape != r.shape or c.numel() == 0:
        raise ValueError(
            f"pairwise_accuracy: need two non-empty lists of one length, got {c.shape}, {r.shape}"
        )
    return float((c > r).double().mean())


# --------------------------------------------------------------------------- helpers
def _generate(rollout: Any, prompt_ids: list[list[int]], seed: int) -> list[Any]:
    return [g[0] for g in rollout.generate(prompt_ids, n=1, seed=seed)]


@torch.no_grad()
def _logprobs(lm: Any, batch: Any, temperature: float) -> torch.Tensor:
    from engine.scoring import ReferenceModel

    return ReferenceModel(lm).logprobs(batch, temperature)


def _rm_scores(scorer: Any, batch: Any) -> torch.Tensor:
    scores, valid = scorer.score(
        [""] * batch.batch_size, [""] * batch.batch_size, batch.sequences, batch.attention_mask
    )
    return scores.masked_fill(~valid, float("nan"))


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean())


# --------------------------------------------------------------------------- the stage
def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate; returns the metrics dict (also written to ``<output_dir>/eval.json``)."""
    D.init_distributed()
    cfg.validate(D.world_size())
    result: dict[str, Any] = {}
    if D.is_main():
        result = _evaluate(cfg)
        out = Path(cfg.output_dir)
        save_config(cfg, out)
        (out / "eval.json").write_text(json.dumps(result, indent=2, allow_nan=True))
    D.barrier()
    return result


def _evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from engine.best_of_n import build_reward
    from engine.config import DataConfig, RewardConfig
    from engine.data import PromptDataset
    from engine.dpo import collate_pairs, load_preference_pairs, pack_rows
    from engine.models import check_tokenizer_matches, load_causal_lm, load_tokenizer

    t0 = time.time()
    m, d, T = cfg.models, cfg.data, cfg.rollout.temperature
    torch.manual_seed(cfg.seed)
    # Load (and so kind-check) every checkpoint before generating anything.
    policy = load_causal_lm(m.policy, torch.float32, "sdpa") if m.policy else None
    ref_path = m.reference or m.baseline
    baseline = load_causal_lm(m.baseline, torch.float32, "sdpa") if m.policy and m.baseline else None
    ref = load_causal_lm(ref_path, torch.float32, "sdpa") if m.policy and ref_path else None
    rm = (
        build_reward(RewardConfig(kind="model", model_path=m.reward_model, clip=0.0))
        if m.reward_model
        else None
    )
    gold = build_reward(RewardConfig(kind="function", function=m.gold, clip=0.0)) if m.gold else None
    tokenizer = load_tokenizer(m.tokenizer or m.policy or m.baseline or m.reward_model, role="tokenizer")
    for model in (policy, baseline, ref):
        if model is not None:
            check_tokenizer_matches(tokenizer, model.config)
    result: dict[str, Any] = {"policy": m.policy, "baseline": m.baseline, "reference": ref_path}
    result["reward_model"] = m.reward_model

    if policy is not None:
        dataset = PromptDataset(
            DataConfig(prompts=d.prompts, max_prompt_len=d.max_prompt_len, num_prompts=d.num_prompts or 64),
            tokenizer,
            seed=cfg.seed,
        )
        n = min(len(dataset), d.num_prompts) if d.num_prompts else len(dataset)
        texts, prompt_ids = dataset.texts[:n], dataset.input_ids[:n]
        rollout = _build_rollout(cfg, m.policy, policy, tokenizer)
        try:
            pol = _generate(rollout, prompt_ids, cfg.seed)
            base = None
            if baseline is not None:
                if cfg.rollout.backend == "vllm":
                    rollout.load_weights(list(baseline.named_parameters()))
                    rollout.finish_sync(1)
                else:
                    rollout.model = baseline
                base = _generate(rollout, prompt_ids, cfg.seed)
        finally:
            rollout.close()
        pb = pack_rows(prompt_ids, [s.response_ids for s in pol], tokenizer.pad_token_id)
        pol_text = tokenizer.batch_decode([s.response_ids for s in pol], skip_special_tokens=True)
        rows: dict[str, Any] = {"prompt": texts, "policy_response": pol_text}
        rows["policy_response_ids"] = [s.response_ids for s in pol]
        lengths = pb.action_mask.sum(-1).double()
        result.update({"num_prompts": n, "temperature": T, "response_len": float(lengths.mean())})
        result["stop_rate"] = sum(s.finish_reason == "stop" for s in pol) / n
        if ref is not None:
            kl = sequence_kl(_logprobs(policy, pb, T), _logprobs(ref, pb, T), pb.action_mask)
            result["kl"], rows["kl"] = _mean(kl), kl.tolist()
        if base is not None:
            bb = pack_rows(prompt_ids, [s.response_ids for s in base], tokenizer.pad_token_id)
            rows["baseline_response"] = tokenizer.batch_decode(
                [s.response_ids for s in base], skip_special_tokens=True
            )
            result["baseline_response_len"] = float(bb.action_mask.sum(-1).double().mean())
        for name, scorer in (("rm", rm), ("gold", gold)):
            if scorer is None:
                continue
            if name == "rm":
                a = _rm_scores(scorer, pb)
            else:
                a = scorer.score(texts, pol_text)[0]
            result[f"{name}_reward"], rows[f"{name}_policy"] = _mean(a), a.tolist()
            if base is not None:
                b = (
                    _rm_scores(scorer, bb)
                    if name == "rm"
                    else scorer.score(texts, rows["baseline_response"])[0]
                )
                result[f"{name}_reward_baseline"], rows[f"{name}_baseline"] = _mean(b), b.tolist()
                result[f"win_rate_{name}"] = win_rate(a, b)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        with (Path(cfg.output_dir) / "eval_samples.jsonl").open("w") as f:
            for i in range(n):
                f.write(json.dumps({k: v[i] for k, v in rows.items()}) + "\n")

    if rm is not None and d.pairs:
        pairs, stats = load_preference_pairs(d.pairs, tokenizer, d.pairs_max_len, d.pairs_max_prompt_len)
        scores = _rm_scores(rm, collate_pairs(pairs, tokenizer.pad_token_id))
        c, r = scores[: len(pairs)], scores[len(pairs) :]
        result.update({"rm_accuracy": pairwise_accuracy(c, r), "rm_margin": _mean(c - r)})
        result["rm_pairs"] = len(pairs)
        result["rm_pairs_identical_dropped"] = stats.extra["pairs_identical_dropped"]
    result["wall_s"] = time.time() - t0
    return result


def _build_rollout(cfg: EvalConfig, policy_dir: str, policy: Any, tokenizer: Any) -> Any:
    if cfg.rollout.backend == "vllm":
        from engine.rollout import VLLMRollout

        max_len = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens + 1
        return VLLMRollout(policy_dir, cfg.rollout, cfg.seed, max_len, "float32")
    from engine.rollout import HFRollout

    return HFRollout(policy, tokenizer, cfg.rollout)


def main_eval(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``load_config(EvalConfig, config_path, overrides)`` then ``run_eval``."""
    return run_eval(load_config(EvalConfig, config_path, overrides))
