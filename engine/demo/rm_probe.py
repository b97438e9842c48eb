"""Does the reward model order a policy's own samples the way the gold scorer does?

``python -m tritonrlhf.engine.demo.rm_probe --policy DIR --reward-model DIR --gold module:function --prompts JSONL``

A reward model's held-out accuracy is measured on its own kind of pairs. PPO asks it something
else: to rank several samples of the *policy* for one prompt. This probe samples ``--samples``
responses per prompt from the policy (transformers ``generate``, temperature 1 by default),
scores each with the RM and the gold scorer, and reports over every within-prompt pair whose
gold scores differ the share the RM orders the same way (a tie in RM score is a miss).
``--only-texts REGEX`` keeps only pairs where both responses fully match the pattern (on the demo
task ``'[0-9]+'``: the digits alone, without a filler). ``--out`` writes the samples as JSONL.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tritonrlhf.engine.config import ConfigError


def pair_agreement(
    groups: Sequence[Sequence[tuple[str, float, float]]], only: re.Pattern[str] | None = None
) -> tuple[float, int]:
    """(share of pairs ordered alike, pairs counted) over ``(response, rm, gold)`` groups per prompt."""
    hits = total = 0
    for group in groups:
        for (ta, ra, ga), (tb, rb, gb) in itertools.combinations(group, 2):
            if ga == gb or (
                only is not None and not (only.fullmatch(ta.strip()) and only.fullmatch(tb.strip()))
            ):
                continue
            total += 1
            hits += (ra - rb) * (ga - gb) > 0
    return (hits / total if total else float("nan")), total


@torch.no_grad()
def probe(
    policy: str,
    reward_model: str,
    gold: str,
    prompts_path: str,
    samples: int = 4,
    num_prompts: int = 256,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    only_texts: str = "",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the probe; returns (summary, sample rows).

    Sampling is ``tritonrlhf.engine.rl.hf_rollout.HFRollout`` (the trainer's transformers backend) and the batch
    layout ``collate_samples``'s, so the RM scores each sample exactly as PPO's scorer would.
    """
    from tritonrlhf.engine.config import RolloutConfig
    from tritonrlhf.engine.data import read_jsonl
    from tritonrlhf.engine.models import check_tokenizer_matches, load_causal_lm, load_tokenizer
    from tritonrlhf.engine.rl.experience import collate_samples
    from tritonrlhf.engine.rl.hf_rollout import HFRollout
    from tritonrlhf.engine.stages.evaluate import _load_gold, _load_rm

    if samples < 2:
        raise ConfigError(f"--samples must be >= 2 to form pairs, got {samples}")
    for flag, path in (("--policy", policy), ("--reward-model", reward_model), ("--prompts", prompts_path)):
        if not Path(path).exists():
            raise ConfigError(f"{flag}: {path} does not exist")
    only = re.compile(only_texts) if only_texts else None
    prompts = [r["prompt"] for r in read_jsonl(prompts_path, ["prompt"])][:num_prompts]
    tok = load_tokenizer(policy, role="--policy")
    lm = load_causal_lm(policy, torch.float32, "sdpa", role="--policy")
    check_tokenizer_matches(tok, lm.config)
    rm, gold_fn = _load_rm(reward_model, tok), _load_gold(gold)  # the RM's route is logged
    rollout = HFRollout(lm, tok, RolloutConfig(max_new_tokens=max_new_tokens, temperature=temperature))
    rows: list[dict[str, Any]] = []
    groups = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        flat = [
            s for g in rollout.generate([tok(p)["input_ids"] for p in chunk], samples, seed + i) for s in g
        ]
        rb = collate_samples(flat, tok, tok.pad_token_id)
        ps = [p for p in chunk for _ in range(samples)]
        rm_scores, _ = rm.score(rb.prompts, rb.responses, rb.sequences, rb.attention_mask, rb.finish_reasons)
        gold_scores, _ = gold_fn.score(ps, rb.responses)
        for j, p in enumerate(chunk):
            group = []
            for k in range(j * samples, (j + 1) * samples):
                text, r, g = rb.responses[k], float(rm_scores[k]), float(gold_scores[k])
                rows.append(
                    {"prompt": p, "response": text, "response_ids": flat[k].response_ids, "rm": r, "gold": g}
                )
                group.append((text, r, g))
            groups.append(group)
    acc, pairs = pair_agreement(groups, only)
    summary = {
        "policy": policy,
        "reward_model": reward_model,
        "prompts": len(prompts),
        "samples_per_prompt": samples,
        "only_texts": only_texts,
        "rm_gold_pair_agreement": acc,
        "pairs": pairs,
        "rm_mean": sum(r["rm"] for r in rows) / len(rows),
        "gold_mean": sum(r["gold"] for r in rows) / len(rows),
    }
    return summary, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tritonrlhf.engine.demo.rm_probe", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reward-model", required=True)
    ap.add_argument("--gold", required=True, help="module:function scoring (prompts, responses)")
    ap.add_argument("--prompts", required=True, help='JSONL with a "prompt" per line')
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only-texts", default="", help="keep pairs whose two responses fully match this regex")
    ap.add_argument("--out", default="", help="write the samples here as JSONL")
    a = ap.parse_args(argv)
    try:
        summary, rows = probe(
            a.policy,
            a.reward_model,
            a.gold,
            a.prompts,
            a.samples,
            a.num_prompts,
            a.max_new_tokens,
            a.temperature,
            seed=a.seed,
            only_texts=a.only_texts,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
