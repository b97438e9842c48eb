"""The eval stage: a policy checkpoint on held-out prompts, and a reward model on preference pairs.

For the policy (``models.policy``), with one sample per prompt at ``rollout.temperature``:

* ``rm_reward`` / ``gold_reward``: mean reward-model score and mean gold score (``models.gold``,
  a ``module:function`` such as ``tritonrlhf.engine.demo.task:gold_reward``) of its samples;
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

Several policies in one process: ``models.policies={sft: runs/sft, ppo: runs/ppo/final}`` (a
YAML mapping, name -> checkpoint) instead of ``models.policy``. The baseline, reference, RM,
gold scorer, prompts and the baseline's samples are loaded or made once, and one rollout
engine serves every policy. Each policy's metrics go to ``<output_dir>/<name>/eval.json``
(the keys of a single-policy ``eval.json``) with its ``eval_samples.jsonl``; the top-level
``eval.json`` holds ``{"policies": {name: metrics}}`` and the RM accuracy.

Generation: one rollout engine, built from the baseline (else the first policy). With vLLM each
other policy's weights are swapped into it (``load_weights`` + ``finish_sync``) instead of
building another ``LLM`` in-process; a policy of another architecture gets a fresh engine.
A policy whose checkpoint is the baseline's reuses the baseline's samples (same seed, same
samples). Rank 0 does the work; other ranks (under ``deepspeed``) wait. The result is returned
and written to ``<output_dir>/eval.json``; per-prompt rows go to ``eval_samples.jsonl``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tritonrlhf.engine import distributed as D
from tritonrlhf.engine.config import ConfigError, RolloutConfig, StageConfig, load_config, save_config
from tritonrlhf.engine.stages.sampling import PolicySampler, same_path


# --------------------------------------------------------------------------- config
@dataclass
class EvalModelsConfig:
    policy: str = ""  # causal-LM checkpoint to evaluate; empty: RM accuracy only (or `policies`)
    policies: dict[str, str] = field(default_factory=dict)  # name -> checkpoint, several in one run
    baseline: str = "runs/sft"  # win rates against this policy; empty: none
    reference: str = ""  # KL reference; empty: the baseline
    reward_model: str = ""  # sequence-classification RM; empty: no RM metrics
    gold: str = ""  # reward callable module:function, e.g. tritonrlhf.engine.demo.task:gold_reward
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
        self.rollout.validate()
        if not isinstance(m.policies, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in m.policies.items()
        ):
            raise ConfigError(
                f"models.policies must be a mapping name -> checkpoint path, e.g. "
                f"'models.policies={{sft: runs/sft, ppo: runs/ppo/final}}'; got {m.policies!r}"
            )
        if m.policy and m.policies:
            raise ConfigError("set models.policy or models.policies, not both")
        for name in m.policies:
            if not name or name != Path(name).name or name.startswith("."):
                raise ConfigError(f"models.policies: {name!r} is not a usable name (it names a folder)")
        if not self.policy_paths() and not (m.reward_model and d.pairs):
            raise ConfigError(
                "nothing to evaluate: set models.policy (or models.policies), "
                "or models.reward_model with data.pairs"
            )
        if d.num_prompts < 0:
            raise ConfigError(f"data.num_prompts must be >= 0, got {d.num_prompts}")
        paths = [("models.policy", m.policy), *((f"models.policies.{k}", v) for k, v in m.policies.items())]
        paths += [(f"models.{k}", getattr(m, k)) for k in ("baseline", "reference", "reward_model")]
        paths += [("models.tokenizer", m.tokenizer), ("data.pairs", d.pairs)]
        if self.policy_paths() and d.prompts != "toy":
            paths.append(("data.prompts", d.prompts))
        for key, path in paths:
            if path and not Path(path).exists():
                raise ConfigError(f"{key}: path does not exist: {path}")

    def policy_paths(self) -> dict[str, str]:
        """name -> checkpoint of every policy to evaluate (``{"policy": models.policy}`` alone)."""
        if self.models.policies:
            return dict(self.models.policies)
        return {"policy": self.models.policy} if self.models.policy else {}


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


def rm_gold_agreement(
    rm_a: Sequence[float], rm_b: Sequence[float], gold_a: Sequence[float], gold_b: Sequence[float]
) -> tuple[float, int]:
    """How often the RM orders two responses to one prompt as the gold scorer does: (accuracy, pairs).

    Item i compares response a_i (the policy's) with b_i (the baseline's). Only items whose gold
    scores are both known (finite) and differ count; an RM tie there is a miss. NaN accuracy when no item counts. This is the
    RM's accuracy on the policy's own samples, the comparisons PPO actually asks of it.
    """
    ra, rb, ga, gb = (torch.as_tensor(x, dtype=torch.float64) for x in (rm_a, rm_b, gold_a, gold_b))
    if not ra.shape == rb.shape == ga.shape == gb.shape or ra.dim() != 1:
        raise ValueError(
            f"rm_gold_agreement: need four 1-d score lists of one length, got "
            f"{tuple(ra.shape)}, {tuple(rb.shape)}, {tuple(ga.shape)}, {tuple(gb.shape)}"
        )
    # Unknown gold (NaN: no score) is excluded; ``nan != nan`` would count it, as a miss.
    counted = (ga != gb) & torch.isfinite(ga) & torch.isfinite(gb)
    n = int(counted.sum())
    if n == 0:
        return float("nan"), 0
    agree = torch.sign(ra - rb) == torch.sign(ga - gb)
    return float(agree[counted].double().mean()), n


# --------------------------------------------------------------------------- helpers
@torch.no_grad()
def _logprobs(lm: Any, batch: Any, temperature: float) -> torch.Tensor:
    from tritonrlhf.engine.rl.scoring import ReferenceModel

    return ReferenceModel(lm).logprobs(batch, temperature)


def _rm_scores(
    scorer: Any,
    batch: Any,
    prompts: list[str] | None = None,
    responses: list[str] | None = None,
    reasons=None,
) -> torch.Tensor:
    """RM scores of a packed batch (NaN where invalid); a text-route RM reads ``prompts``/``responses``."""
    B = batch.batch_size
    scores, valid = scorer.score(
        prompts or [""] * B, responses or [""] * B, batch.sequences, batch.attention_mask, reasons
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
    from tritonrlhf.engine.config import DataConfig
    from tritonrlhf.engine.data import PromptDataset, columns_by_name
    from tritonrlhf.engine.models import (
        check_tokenizer_matches,
        load_causal_lm,
        load_tokenizer,
        require_checkpoint_kind,
    )

    t0 = time.time()
    m, d = cfg.models, cfg.data
    torch.manual_seed(cfg.seed)
    policies = cfg.policy_paths()
    single = not m.policies
    roles = {name: "models.policy" if single else f"models.policies.{name}" for name in policies}
    ref_path = m.reference or m.baseline
    # Check every checkpoint's kind (config.json only) and load the shared models before generating.
    configs = {name: require_checkpoint_kind(p, roles[name], "causal_lm") for name, p in policies.items()}

    def load(path: str, role: str) -> Any:
        return load_causal_lm(path, torch.float32, "sdpa", role=role)

    baseline = load(m.baseline, "models.baseline") if policies and m.baseline else None
    ref = None
    if policies and ref_path:
        ref = baseline if same_path(ref_path, m.baseline) else load(ref_path, "models.reference")
    gold = _load_gold(m.gold) if m.gold else None
    first = next(iter(policies.values()), "")
    tokenizer = load_tokenizer(m.tokenizer or first or m.baseline or m.reward_model, role="tokenizer")
    rm = _load_rm(m.reward_model, tokenizer) if m.reward_model else None
    for config in [*configs.values(), *(x.config for x in (baseline, ref) if x is not None)]:
        check_tokenizer_matches(tokenizer, config)
    result: dict[str, Any] = {}
    if single:
        result["policy"] = m.policy
    result.update({"baseline": m.baseline, "reference": ref_path, "reward_model": m.reward_model})

    if policies:
        dataset = PromptDataset(
            DataConfig(prompts=d.prompts, max_prompt_len=d.max_prompt_len, num_prompts=d.num_prompts or 64),
            tokenizer,
            seed=cfg.seed,
        )
        n = min(len(dataset), d.num_prompts) if d.num_prompts else len(dataset)
        if rm is not None and rm.text_route is not None:
            rm.text_route.chats = dataset.chats  # chat prompts reach the RM as chats
        ev = _PolicyEval(cfg, tokenizer, dataset.texts[:n], dataset.input_ids[:n], ref, rm, gold)
        ev.columns = columns_by_name(dataset.columns[:n])  # each record's columns, for the gold function
        per_policy: dict[str, dict[str, Any]] = {}
        try:
            if baseline is not None:
                ev.set_baseline(m.baseline, baseline)
            for name, path in policies.items():
                t1 = time.time()
                model = baseline if same_path(path, m.baseline) else load(path, roles[name])
                metrics, rows = ev.evaluate(path, model)
                del model
                metrics["wall_s"] = time.time() - t1
                out = Path(cfg.output_dir) if single else Path(cfg.output_dir) / name
                _write_rows(out / "eval_samples.jsonl", rows)
                if not single:
                    metrics = {"policy": path, **metrics}
                    shared = {k: result[k] for k in ("baseline", "reference", "reward_model")}
                    text = json.dumps({**shared, **metrics}, indent=2, allow_nan=True)
                    (out / "eval.json").write_text(text)
                per_policy[name] = metrics
                print(f"[eval] {name}: " + _brief(metrics), flush=True)
        finally:
            ev.close()
        if single:
            result.update(per_policy["policy"])
            result.pop("wall_s", None)
        else:
            result["policies"] = per_policy

    if rm is not None and d.pairs:
        from tritonrlhf.engine.stages.dpo import collate_pairs, load_preference_pairs

        # The pairs are tokenized as the rm stage does, with the tokenizer the RM reads.
        rm_tok = rm.text_route.tokenizer if rm.text_route is not None else tokenizer
        pairs, stats = load_preference_pairs(d.pairs, rm_tok, d.pairs_max_len, d.pairs_max_prompt_len)
        batch = collate_pairs(pairs, rm_tok.pad_token_id)
        scores = _rm_scores(rm.token_scorer(), batch)
        c, r = scores[: len(pairs)], scores[len(pairs) :]
        result.update({"rm_accuracy": pairwise_accuracy(c, r), "rm_margin": _mean(c - r)})
        result["rm_pairs"] = len(pairs)
        result["rm_pairs_identical_dropped"] = stats.extra["pairs_identical_dropped"]
    result["wall_s"] = time.time() - t0
    return result


def _load_rm(path: str, tokenizer: Any) -> Any:
    """The RM scorer; it reads the eval tokenizer's ids, or re-tokenized text when its own differs."""
    from tritonrlhf.engine.models import load_reward_model
    from tritonrlhf.engine.rl.reward_route import resolve_reward_route
    from tritonrlhf.engine.rl.scoring import RewardScorer

    role = "models.reward_model"
    route = resolve_reward_route("auto", tokenizer, path, role=role, key="the reward model's tokenizer")
    print(route.log_line(role), flush=True)
    model = load_reward_model(path, torch.float32, "auto", role=role)
    return RewardScorer(model=model, text_route=route.text)


def _load_gold(spec: str) -> Any:
    from tritonrlhf.engine.rl.scoring import RewardScorer
    from tritonrlhf.engine.tasks import load_callable

    return RewardScorer.from_function(load_callable(spec))


def _brief(metrics: dict[str, Any]) -> str:
    keys = ("gold_reward", "rm_reward", "kl", "win_rate_gold", "response_len", "wall_s")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float))


def _write_rows(path: Path, rows: dict[str, list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(rows["prompt"])
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({k: v[i] for k, v in rows.items()}) + "\n")


class _PolicyEval:
    """The shared state of an eval run: prompts, the rollout engine, scorers and the baseline's samples.

    ``evaluate(path, model)`` samples the policy once per prompt (the engine is built on first
    use and re-pointed at each policy) and returns ``(metrics, per-prompt rows)``.
    """

    def __init__(
        self, cfg: EvalConfig, tokenizer: Any, texts: list[str], prompt_ids: list[list[int]], ref, rm, gold
    ):
        self.cfg, self.tok, self.texts, self.prompt_ids = cfg, tokenizer, texts, prompt_ids
        self.ref, self.scorers = ref, {"rm": rm, "gold": gold}
        self.sampler = PolicySampler(cfg.rollout, tokenizer, cfg.seed, cfg.data.max_prompt_len)
        self.base: dict[str, Any] | None = None  # baseline samples, batch, texts and scores
        self.columns: dict[str, list[Any]] = {}  # the prompt records' columns, name -> [n]

    def close(self) -> None:
        self.sampler.close()

    def _sample(self, path: str, model: Any) -> tuple[list[Any], Any, list[str]]:
        """(samples, packed batch, decoded responses) of ``model``: one sample per prompt at ``cfg.seed``."""
        return self.sampler.sample(path, model, self.prompt_ids, self.cfg.seed)

    def _scores(self, name: str, batch: Any, responses: list[str], samples: list[Any]) -> torch.Tensor:
        scorer = self.scorers[name]
        if name != "rm":
            reasons = [s.finish_reason for s in samples]
            return scorer.score(self.texts, responses, finish_reasons=reasons, columns=self.columns)[0]
        prompts = self.tok.batch_decode(self.prompt_ids, skip_special_tokens=True)  # as PPO's batches
        return _rm_scores(scorer, batch, prompts, responses, [s.finish_reason for s in samples])

    def set_baseline(self, path: str, model: Any) -> None:
        samples, batch, text = self._sample(path, model)
        scores = {k: self._scores(k, batch, text, samples) for k, s in self.scorers.items() if s is not None}
        self.base = {"path": path, "samples": samples, "batch": batch, "text": text, "scores": scores}

    def evaluate(self, path: str, model: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        T, n, base = self.cfg.rollout.temperature, len(self.prompt_ids), self.base
        if base is not None and same_path(path, base["path"]):  # same weights, same seed: same samples
            samples, batch, text = base["samples"], base["batch"], base["text"]
        else:
            samples, batch, text = self._sample(path, model)
        rows: dict[str, list[Any]] = {"prompt": self.texts, "policy_response": text}
        rows["policy_response_ids"] = [s.response_ids for s in samples]
        result: dict[str, Any] = {"num_prompts": n, "temperature": T}
        result["response_len"] = float(batch.action_mask.sum(-1).double().mean())
        result["stop_rate"] = sum(s.finish_reason == "stop" for s in samples) / n
        if self.ref is not None:
            kl = sequence_kl(_logprobs(model, batch, T), _logprobs(self.ref, batch, T), batch.action_mask)
            result["kl"], rows["kl"] = _mean(kl), kl.tolist()
        if base is not None:
            rows["baseline_response"] = base["text"]
            result["baseline_response_len"] = float(base["batch"].action_mask.sum(-1).double().mean())
        for name, scorer in self.scorers.items():
            if scorer is None:
                continue
            a = self._scores(name, batch, text, samples)
            result[f"{name}_reward"], rows[f"{name}_policy"] = _mean(a), a.tolist()
            if base is not None:
                b = base["scores"][name]
                result[f"{name}_reward_baseline"], rows[f"{name}_baseline"] = _mean(b), b.tolist()
                result[f"win_rate_{name}"] = win_rate(a, b)
        if base is not None and "rm_policy" in rows and "gold_policy" in rows:
            acc, pairs = rm_gold_agreement(
                rows["rm_policy"], base["scores"]["rm"], rows["gold_policy"], base["scores"]["gold"]
            )
            result["rm_gold_agreement"], result["rm_gold_agreement_pairs"] = acc, pairs
        return result, rows


def main_eval(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``load_config(EvalConfig, config_path, overrides)`` then ``run_eval``."""
    return run_eval(load_config(EvalConfig, config_path, overrides))
