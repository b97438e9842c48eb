"""Constitutional AI's supervised stage: critique and revise a policy's answers, keep the revisions as SFT data.

``python -m tritonrlhf.engine.cli revise --config configs/revise_demo.yaml``, read top to bottom in ``_revise``:

1. **answer**: the policy (``policy``) answers each prompt of ``data.prompts`` once (``rollout``);
2. **critique**: for each answer the judge (``judge.path``, any HF causal LM) writes a critique
   against one principle sampled from the constitution (``critique_template``, ``critique``
   sampling settings);
3. **revise**: the judge rewrites the answer given the principle and its critique
   (``revision_template``, ``revision`` settings); with ``rounds`` > 1 the revision is critiqued
   and revised again, each round under a newly sampled principle.

Output in ``output_dir``: ``revisions.jsonl``, SFT data (``{"prompt", "response"}``, the last
revision) that ``tritonrlhf.engine.cli sft data.train=...`` reads as is, and ``revise_log.jsonl`` with every
round's principle, critique and revision. A revision that is empty or was cut at
``revision.max_new_tokens`` is left out of the SFT data and counted (``revise.json``): a cut
revision is not an answer the judge finished.

The policy and the judge may use different tokenizers: everything between them passes as text.
The two never hold memory at once: the policy's engine is closed before the judge's is built.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tritonrlhf.engine.config import (
    ConfigError,
    RolloutConfig,
    StageConfig,
    check_positive,
    load_config,
    save_config,
)
from tritonrlhf.engine.stages.common import run_on_main
from tritonrlhf.engine.stages.label import JudgeConfig, judge_max_len

CRITIQUE_TEMPLATE = "principle: {principle}\nrequest: {prompt}\nanswer: {response}\ncritique:"
REVISION_TEMPLATE = (
    "principle: {principle}\nrequest: {prompt}\nanswer: {response}\ncritique: {critique}\nrevision:"
)


@dataclass
class ReviseDataConfig:
    prompts: str = "data/demo/prompts.jsonl"  # JSONL with "prompt"
    num_prompts: int = 0  # first N; 0: all
    max_prompt_len: int = 64


@dataclass
class JudgeSamplingConfig(RolloutConfig):
    max_new_tokens: int = 32
    temperature: float = 0.7


@dataclass
class ReviseConfig(StageConfig):
    output_dir: str = "runs/revise"
    policy: str = "runs/sft"  # causal-LM checkpoint whose answers are revised
    constitution: str = "configs/constitution_demo.yaml"
    critique_template: str = CRITIQUE_TEMPLATE  # slots: {principle} {prompt} {response}
    revision_template: str = REVISION_TEMPLATE  # slots: {principle} {prompt} {response} {critique}
    rounds: int = 1
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    data: ReviseDataConfig = field(default_factory=ReviseDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # the policy's answers
    critique: JudgeSamplingConfig = field(default_factory=JudgeSamplingConfig)
    revision: JudgeSamplingConfig = field(default_factory=JudgeSamplingConfig)

    def validate(self, world_size: int = 1) -> None:
        for key, path in (("policy", self.policy), ("judge.path", self.judge.path)):
            if not Path(path).exists():
                raise ConfigError(f"{key}: path does not exist: {path}")
        if self.judge.tokenizer and not Path(self.judge.tokenizer).exists():
            raise ConfigError(f"judge.tokenizer: path does not exist: {self.judge.tokenizer}")
        for key, path in (("constitution", self.constitution), ("data.prompts", self.data.prompts)):
            if not Path(path).is_file():
                raise ConfigError(f"{key}: file does not exist: {path}")
        slots = {"principle": "", "prompt": "", "response": "", "critique": ""}
        for key, needed in (("critique_template", 3), ("revision_template", 4)):
            text = getattr(self, key)
            for slot in list(slots)[:needed]:
                if "{" + slot + "}" not in text:
                    raise ConfigError(f"{key}: the template needs the slot {{{slot}}}")
            try:
                text.format(**slots)
            except (IndexError, KeyError, ValueError) as e:
                raise ConfigError(
                    f"{key} has an unknown slot ({e!r}); write literal braces as {{{{ }}}}"
                ) from None
        check_positive("rounds", self.rounds)
        check_positive("data.max_prompt_len", self.data.max_prompt_len)
        if self.data.num_prompts < 0:
            raise ConfigError(f"data.num_prompts must be >= 0, got {self.data.num_prompts}")
        for name in ("rollout", "critique", "revision"):
            getattr(self, name).validate(name)
        if self.critique.backend != self.revision.backend:
            raise ConfigError(
                "critique.backend and revision.backend must match (one judge engine serves both)"
            )


def _generate(
    engine: Any, rcfg: RolloutConfig, tok: Any, texts: list[str], seed: int
) -> tuple[list[str], list[str]]:
    """(decoded responses, finish reasons) of ``engine`` under ``rcfg``, one sample per prompt text."""
    from tritonrlhf.engine.stages.common import encode_prompt

    engine.cfg = rcfg  # critique and revision share one judge engine with their own settings
    samples = [g[0] for g in engine.generate([encode_prompt(tok, t) for t in texts], n=1, seed=seed)]
    text = tok.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    return [t.strip() for t in text], [s.finish_reason for s in samples]


def run_revise(cfg: ReviseConfig) -> dict[str, Any]:
    """Answer, critique, revise; returns ``revise.json``'s content."""
    return run_on_main(cfg, _revise)


def _revise(cfg: ReviseConfig) -> dict[str, Any]:
    from tritonrlhf.engine.data import read_jsonl
    from tritonrlhf.engine.models import (
        check_tokenizer_matches,
        load_causal_lm,
        load_tokenizer,
        require_checkpoint_kind,
    )
    from tritonrlhf.engine.rl.engines import open_rollout
    from tritonrlhf.engine.stages.common import encode_prompt
    from tritonrlhf.engine.stages.label import load_constitution
    from tritonrlhf.engine.stages.sampling import PolicySampler

    t0 = time.time()
    principles = load_constitution(cfg.constitution)
    judge_config = require_checkpoint_kind(cfg.judge.path, "judge.path", "causal_lm")
    policy_config = require_checkpoint_kind(cfg.policy, "policy", "causal_lm")
    judge_tok = load_tokenizer(cfg.judge.tokenizer or cfg.judge.path, role="judge.tokenizer")
    policy_tok = load_tokenizer(cfg.policy, role="policy")
    check_tokenizer_matches(judge_tok, judge_config)
    check_tokenizer_matches(policy_tok, policy_config)
    prompts = [r["prompt"] for r in read_jsonl(cfg.data.prompts, ["prompt"])]
    prompts = prompts[: cfg.data.num_prompts] if cfg.data.num_prompts else prompts
    ids = [encode_prompt(policy_tok, p) for p in prompts]
    if max(map(len, ids)) > cfg.data.max_prompt_len:
        raise ConfigError(f"a prompt is longer than data.max_prompt_len={cfg.data.max_prompt_len} tokens")

    # 1. answer
    sampler = PolicySampler(cfg.rollout, policy_tok, cfg.seed, cfg.data.max_prompt_len)
    try:
        model = load_causal_lm(cfg.policy, torch.float32, "sdpa", role="policy")
        _, _, answers = sampler.sample(cfg.policy, model, ids, cfg.seed)
        del model
    finally:
        sampler.close()

    # 2-3. critique and revise, ``rounds`` times, with the judge
    rng = random.Random(cfg.seed)
    log: list[list[dict[str, Any]]] = [[] for _ in prompts]
    current = [a.strip() for a in answers]
    reasons = ["stop"] * len(prompts)
    max_len = judge_max_len(cfg.judge, judge_config)
    bans = any(c.banned_strings or c.banned_patterns for c in (cfg.critique, cfg.revision))
    judge = open_rollout(
        cfg.judge.path, cfg.critique, judge_tok, cfg.seed, max_len, role="judge.path", bans=bans
    )
    try:
        for r in range(cfg.rounds):
            chosen = [rng.choice(principles) for _ in prompts]
            fill = [dict(principle=c, prompt=p, response=a) for c, p, a in zip(chosen, prompts, current)]
            texts = [cfg.critique_template.format(**f) for f in fill]
            longest = max(len(encode_prompt(judge_tok, t)) for t in texts) + cfg.critique.max_new_tokens
            if longest > max_len:
                raise ConfigError(
                    f"a critique prompt plus its answer needs {longest} tokens, over the judge's {max_len}"
                )
            critiques, _ = _generate(
                judge,
                cfg.critique,
                judge_tok,
                [cfg.critique_template.format(**f) for f in fill],
                cfg.seed + 2 * r + 1,
            )
            texts = [cfg.revision_template.format(**f, critique=c) for f, c in zip(fill, critiques)]
            longest = max(len(encode_prompt(judge_tok, t)) for t in texts) + cfg.revision.max_new_tokens
            if longest > max_len:
                raise ConfigError(
                    f"a revision prompt plus its answer needs {longest} tokens, over the judge's {max_len}"
                )
            current, reasons = _generate(judge, cfg.revision, judge_tok, texts, cfg.seed + 2 * r + 2)
            for i in range(len(prompts)):
                log[i].append({"round": r, "principle": chosen[i], "critique": critiques[i], "revision": current[i],
                               "finish_reason": reasons[i]})  # fmt: skip
    finally:
        judge.close()

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    kept = empty = cut = 0
    with (out / "revisions.jsonl").open("w") as f, (out / "revise_log.jsonl").open("w") as g:
        for i, p in enumerate(prompts):
            g.write(json.dumps({"prompt": p, "original": answers[i].strip(), "rounds": log[i]}) + "\n")
            if not current[i]:
                empty += 1
            elif reasons[i] != "stop":
                cut += 1
            else:
                kept += 1
                f.write(json.dumps({"prompt": p, "response": current[i]}) + "\n")
    result = {
        "prompts": len(prompts),
        "kept": kept,
        "dropped_empty": empty,
        "dropped_cut": cut,
        "changed": sum(a.strip() != c for a, c in zip(answers, current)),
        "rounds": cfg.rounds,
        "wall_s": time.time() - t0,
    }
    (out / "revise.json").write_text(json.dumps(result, indent=2))
    print(f"[revise] {kept} of {len(prompts)} revisions kept as SFT data", flush=True)
    if not kept:
        raise RuntimeError(
            f"revise: no revision finished ({empty} empty, {cut} cut at revision.max_new_tokens="
            f"{cfg.revision.max_new_tokens}); the SFT data would be empty. See {out / 'revise_log.jsonl'}"
        )
    return result


def main_revise(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``load_config(ReviseConfig, config_path, overrides)`` then ``run_revise``."""
    return run_revise(load_config(ReviseConfig, config_path, overrides))
