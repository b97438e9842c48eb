"""AI feedback (RLAIF): a judge model labels preference pairs under written principles.

``python -m tritonrlhf.engine.cli label --config configs/label_demo.yaml``. For each candidate pair
(``data.pairs``: JSONL with ``prompt`` and ``response_a``/``response_b``, or ``chosen``/``rejected``
to relabel existing data) the judge (any HF causal LM, ``judge.path``, served by vLLM or HF with
``judge.backend``) reads a judging prompt rendered from ``template``: the principles of the
constitution (``constitution``: YAML with a ``principles`` list), the user's prompt and the two
responses as answer A and answer B. The preference is the judge's next-token probability of
``choices[0]`` against ``choices[1]`` (each must be one token of the judge's tokenizer):

    p_first  = P(A) / (P(A) + P(B))   with response_a shown as A
    p_second = P(B) / (P(A) + P(B))   with the two swapped (response_a shown as B)
    p        = (p_first + p_second) / 2

Averaging both orders cancels the judge's position bias (a judge that always says "A" gets
p = 1/2). ``p > 1/2`` makes response_a ``chosen``; an exact tie is dropped and counted. Output,
``<output_dir>/preferences.jsonl``: the preference JSONL the RM and DPO stages read
(``prompt``, ``chosen``, ``rejected``) with ``judge_p`` (the probability the judge gives the
chosen response, max(p, 1 - p)), ``judge_p_shown_first`` / ``judge_p_shown_second`` (that
probability in each order: the chosen response shown as A, and as B) and the gold scores
carried over (``gold_a``/``gold_b`` or ``gold_chosen``/``gold_rejected`` in, ``gold_chosen``/
``gold_rejected`` out). ``label.json`` reports the counts, the mean position bias
(``mean(p_first - p_second) / 2``: how much more the judge likes whatever is shown first) and,
where the pairs carry gold scores, the labels' agreement with gold.

``principles_per_pair`` > 0 samples that many principles for each pair (seeded by the pair's
index), as Constitutional AI samples one principle per comparison; 0 quotes all of them.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tritonrlhf.engine.config import (
    ConfigError,
    StageConfig,
    check_choice,
    check_positive,
    load_config,
    save_config,
)
from tritonrlhf.engine.stages.common import run_on_main

DEFAULT_TEMPLATE = (
    "principles:\n{principles}\nrequest: {prompt}\nanswer a: {response_a}\nanswer b: {response_b}\n"
    "which answer follows the principles better, a or b?\nbetter:"
)


@dataclass
class JudgeConfig:
    path: str = "runs/teacher"  # causal-LM checkpoint of the judge
    tokenizer: str = ""  # empty: the judge's own
    backend: str = "vllm"  # vllm | hf
    chat_template: bool = False  # render the judging prompt as a user turn of the judge's chat template
    max_len: int = 0  # judging prompt + its answer, in tokens; 0: the judge's max_position_embeddings
    batch_size: int = 64  # judging prompts per forward (hf backend)


@dataclass
class LabelDataConfig:
    pairs: str = "data/demo/candidate_pairs.jsonl"
    num_pairs: int = 0  # first N; 0: all


@dataclass
class LabelConfig(StageConfig):
    output_dir: str = "runs/label"
    constitution: str = "configs/constitution_demo.yaml"
    template: str = DEFAULT_TEMPLATE  # slots: {principles} {prompt} {response_a} {response_b}
    choices: tuple[str, str] = ("a", "b")  # the judge's answer tokens for "A" and "B"
    principles_per_pair: int = 0  # 0: quote every principle
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    data: LabelDataConfig = field(default_factory=LabelDataConfig)

    def validate(self, world_size: int = 1) -> None:
        check_choice("judge.backend", self.judge.backend, ("vllm", "hf"))
        for key, path in (("judge.path", self.judge.path), ("judge.tokenizer", self.judge.tokenizer)):
            if path and not Path(path).exists():
                raise ConfigError(f"{key}: path does not exist: {path}")
        if not Path(self.constitution).is_file():
            raise ConfigError(f"constitution: file does not exist: {self.constitution}")
        if not Path(self.data.pairs).is_file():
            raise ConfigError(f"data.pairs: file does not exist: {self.data.pairs}")
        for slot in ("{principles}", "{prompt}", "{response_a}", "{response_b}"):
            if slot not in self.template:
                raise ConfigError(f"template: the judging template needs the slot {slot}")
        try:
            self.template.format(principles="", prompt="", response_a="", response_b="")
        except (IndexError, KeyError, ValueError) as e:
            raise ConfigError(
                f"template has an unknown slot ({e!r}); write literal braces as {{{{ }}}}"
            ) from None
        if self.choices[0] == self.choices[1] or not all(self.choices):
            raise ConfigError(f"choices must be two different non-empty strings, got {list(self.choices)}")
        if self.principles_per_pair < 0 or self.data.num_pairs < 0:
            raise ConfigError("principles_per_pair and data.num_pairs must be >= 0")
        if self.judge.max_len < 0:
            raise ConfigError(
                f"judge.max_len must be >= 0 (0: the judge's context), got {self.judge.max_len}"
            )
        check_positive("judge.batch_size", self.judge.batch_size)


# --------------------------------------------------------------------------- pieces
def load_constitution(path: str | Path) -> list[str]:
    """The principles of a constitution YAML: ``principles`` as strings or ``{name, text}`` maps."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    items = data.get("principles") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{p}: expected a mapping with a non-empty 'principles' list")
    out = []
    for i, item in enumerate(items):
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{p}: principles[{i}] must be a non-empty string or a mapping with 'text'")
        out.append(text.strip())
    return out


def pick_principles(principles: list[str], k: int, seed: int, index: int) -> list[str]:
    """All principles (k = 0) or ``k`` of them, sampled without replacement by (seed, index), in file order."""
    if k <= 0 or k >= len(principles):
        return list(principles)
    rng = random.Random(seed * 1_000_003 + index)
    return [principles[i] for i in sorted(rng.sample(range(len(principles)), k))]


def preference(
    lp_first: torch.Tensor, lp_second: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, p_first, p_second), each [N]: P(response_a is better), from the two orders' log-probs.

    ``lp_first[i] = (log P(A), log P(B))`` with response_a shown as A; ``lp_second[i]`` the same
    with the responses swapped. Each order is a two-way softmax over the choice tokens.
    """
    p_first = torch.softmax(lp_first.double(), -1)[:, 0]
    p_second = torch.softmax(lp_second.double(), -1)[:, 1]
    return (p_first + p_second) / 2, p_first, p_second


def choice_ids(tokenizer: Any, choices: tuple[str, str]) -> list[int]:
    """The token id of each choice; a choice that is not exactly one token is a ConfigError."""
    out = []
    for c in choices:
        ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(
                f"choices: {c!r} is {len(ids)} tokens for the judge's tokenizer; each choice must be one token "
                "(with a BPE tokenizer a leading space often makes it one, e.g. ' A')"
            )
        out.append(ids[0])
    if out[0] == out[1] or tokenizer.unk_token_id in out:
        raise ConfigError(
            f"choices {list(choices)} map to tokens {out}: they must be two known, different tokens"
        )
    return out


def judge_max_len(cfg: JudgeConfig, config: Any) -> int:
    """``judge.max_len``, or the judge's context (``max_position_embeddings``) when 0; never beyond it."""
    context = getattr(config, "max_position_embeddings", None)
    if cfg.max_len and context and cfg.max_len > context:
        raise ConfigError(
            f"judge.max_len={cfg.max_len} exceeds the judge's max_position_embeddings={context}"
        )
    if cfg.max_len:
        return cfg.max_len
    if not context:
        raise ConfigError(
            "judge.max_len=0, but the judge's config has no max_position_embeddings: set judge.max_len"
        )
    return int(context)


def _read_pairs(path: str, limit: int) -> list[dict[str, Any]]:
    from tritonrlhf.engine.data import DataError, read_jsonl

    records = read_jsonl(path, ["prompt"])
    out = []
    for i, rec in enumerate(records[:limit] if limit else records):
        keys = ("response_a", "response_b") if "response_a" in rec else ("chosen", "rejected")
        gold_keys = ("gold_a", "gold_b") if "response_a" in rec else ("gold_chosen", "gold_rejected")
        a, b = rec.get(keys[0]), rec.get(keys[1])
        if not isinstance(a, str) or not isinstance(b, str):
            raise DataError(
                f"{path}: record {i + 1} needs string columns response_a/response_b (or chosen/rejected)"
            )
        gold = [rec.get(k) for k in gold_keys]
        gold = [
            float(g) if isinstance(g, (int, float)) and not isinstance(g, bool) else math.nan for g in gold
        ]
        out.append({"prompt": rec["prompt"], "a": a, "b": b, "gold": gold})
    return out


# --------------------------------------------------------------------------- judges
def _judge_logprobs(
    cfg: LabelConfig, tokenizer: Any, prompts: list[list[int]], ids: list[int], max_len: int
) -> torch.Tensor:
    """[N, 2] log P(choice | judging prompt) of each choice token, from the judge at temperature 1."""
    if cfg.judge.backend == "vllm":
        return _vllm_logprobs(cfg, prompts, ids, max_len)
    from tritonrlhf.engine.models import load_causal_lm

    model = load_causal_lm(cfg.judge.path, torch.float32, "sdpa", role="judge.path").eval()
    rows = []
    with torch.no_grad():
        for i in range(0, len(prompts), cfg.judge.batch_size):
            chunk = prompts[i : i + cfg.judge.batch_size]
            T = max(len(p) for p in chunk)
            x = torch.full((len(chunk), T), tokenizer.pad_token_id, dtype=torch.long)
            am = torch.zeros_like(x)
            for j, p in enumerate(chunk):  # left-padded: every prompt's last token at T - 1
                x[j, T - len(p) :], am[j, T - len(p) :] = torch.tensor(p), 1
            pos = (am.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=x, attention_mask=am, position_ids=pos).logits[:, -1].float()
            rows.append(logits.log_softmax(-1)[:, ids])
    return torch.cat(rows)


def _vllm_logprobs(cfg: LabelConfig, prompts: list[list[int]], ids: list[int], max_len: int) -> torch.Tensor:
    """Prompt log-probs of ``prompt + [choice]`` for both choices: log_softmax(logits) at T = 1."""
    from vllm import SamplingParams

    from tritonrlhf.engine.config import RolloutConfig
    from tritonrlhf.engine.rl.rollout import VLLMRollout

    judge = VLLMRollout(cfg.judge.path, RolloutConfig(), cfg.seed, max_len, "float32")
    try:
        sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        seqs = [{"prompt_token_ids": p + [c]} for p in prompts for c in ids]
        outs = judge.llm.generate(seqs, sp, use_tqdm=False)
        flat = [out.prompt_logprobs[-1][c].logprob for out, c in zip(outs, ids * len(prompts))]
    finally:
        judge.close()
    return torch.tensor(flat, dtype=torch.float64).view(len(prompts), 2)


# --------------------------------------------------------------------------- the stage
def run_label(cfg: LabelConfig) -> dict[str, Any]:
    """Label ``data.pairs`` with the judge; returns ``label.json``'s content."""
    return run_on_main(cfg, _label)


def _label(cfg: LabelConfig) -> dict[str, Any]:
    from tritonrlhf.engine.models import check_tokenizer_matches, load_tokenizer, require_checkpoint_kind
    from tritonrlhf.engine.stages.common import encode_prompt

    t0 = time.time()
    judge_config = require_checkpoint_kind(cfg.judge.path, "judge.path", "causal_lm")
    tokenizer = load_tokenizer(cfg.judge.tokenizer or cfg.judge.path, role="judge.tokenizer")
    check_tokenizer_matches(tokenizer, judge_config)
    ids = choice_ids(tokenizer, cfg.choices)
    principles = load_constitution(cfg.constitution)
    pairs = _read_pairs(cfg.data.pairs, cfg.data.num_pairs)
    if cfg.judge.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("judge.chat_template=true, but the judge's tokenizer has no chat template")

    def render(pair: dict[str, Any], i: int, first: str, second: str) -> list[int]:
        text = cfg.template.format(
            principles="\n".join(
                f"- {p}" for p in pick_principles(principles, cfg.principles_per_pair, cfg.seed, i)
            ),
            prompt=pair["prompt"],
            response_a=first,
            response_b=second,
        )
        if cfg.judge.chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return encode_prompt(tokenizer, text)

    prompts = []
    for i, pair in enumerate(pairs):
        prompts += [render(pair, i, pair["a"], pair["b"]), render(pair, i, pair["b"], pair["a"])]
    longest, max_len = max(len(p) for p in prompts), judge_max_len(cfg.judge, judge_config)
    if longest + 1 > max_len:
        raise ConfigError(f"a judging prompt is {longest} tokens, over the judge's {max_len} (judge.max_len)")
    lp = _judge_logprobs(cfg, tokenizer, prompts, ids, max_len).double()
    p, p_first, p_second = preference(lp[0::2], lp[1::2])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    ties = agree = with_gold = 0
    with (out / "preferences.jsonl").open("w") as f:
        for i, pair in enumerate(pairs):
            pi = float(p[i])
            if pi == 0.5:
                ties += 1
                continue
            a_wins = pi > 0.5
            chosen, rejected = (pair["a"], pair["b"]) if a_wins else (pair["b"], pair["a"])
            gc, gr = pair["gold"] if a_wins else pair["gold"][::-1]
            rec = {"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected}
            # The judge's probability for the chosen response when it was shown first, and second.
            shown = (p_first[i], p_second[i]) if a_wins else (1 - p_second[i], 1 - p_first[i])
            rec.update(judge_p=max(pi, 1 - pi), judge_p_shown_first=float(shown[0]))
            rec.update(judge_p_shown_second=float(shown[1]))
            if not (math.isnan(gc) or math.isnan(gr)):
                rec.update(gold_chosen=gc, gold_rejected=gr)
                if gc != gr:
                    with_gold += 1
                    agree += gc > gr
            f.write(json.dumps(rec) + "\n")
    result = {
        "pairs": len(pairs),
        "labelled": len(pairs) - ties,
        "ties_dropped": ties,
        "position_bias": float((p_first - p_second).mean() / 2),
        "mean_judge_p": float(torch.maximum(p, 1 - p).mean()),
        "gold_pairs": with_gold,
        "agreement_with_gold": agree / with_gold if with_gold else None,
        "wall_s": time.time() - t0,
    }
    (out / "label.json").write_text(json.dumps(result, indent=2))
    print(
        f"[label] {result['labelled']} pairs labelled; agreement with gold {result['agreement_with_gold']}",
        flush=True,
    )
    return result


def main_label(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``load_config(LabelConfig, config_path, overrides)`` then ``run_label``."""
    return run_label(load_config(LabelConfig, config_path, overrides))
