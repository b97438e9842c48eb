"""The demo task: digit-string instructions with a hidden gold scorer, and the data made from it.

Prompts look like ``"reverse 3815:"``, ``"sort 3815:"`` or ``"copy 3815:"`` (3-6 digits);
the answer follows the colon directly (``"5183"``), in the layout every stage
uses: ``<bos> prompt response <eos>``. The toy tokenizer spells each character
as one token, so a tiny model trained from scratch can learn the three
operations: ``copy`` quickly (one induction step), ``reverse`` next, ``sort``
last. A short SFT leaves the policy mediocre on reverse/sort when sampled at
temperature 1, which is the room PPO has to climb.

The gold score gives partial credit: the fraction of target positions the
response gets right, divided by the longer of the two lengths, so missing and
extra characters both cost. It is hidden from training except through data:

* ``make_sft_data``: demonstrations (``{"prompt", "response"}``) with the right
  digits; with ``chatty_rate`` > 0 that share of them trails a chatty filler
  (``"5183 ok"``, ``"5183!"``), as human demonstrations carry habits the
  labellers do not like. The gold scorer wants the exact answer, so a filler costs
  (``"5183 ok"`` scores 4/7). SFT imitates the habit; the preference pairs show
  it is worse; RLHF (PPO, DPO, best-of-n) should learn to drop it while keeping
  the digits right. The demo data (``write_demo_data``) uses ``CHATTY_RATE``.
* ``make_preference_data``: two candidates of differing gold quality (the
  target with 0..L random edits each, and a filler with probability
  ``chatty_rate``), labelled with Bradley-Terry noise:
  the better one is ``chosen`` with probability ``sigmoid((g_better - g_worse) / T)``;
  records also carry ``gold_chosen`` / ``gold_rejected`` for diagnostics;
* ``make_prompts``: prompts for PPO and evaluation.

Everything is deterministic in ``seed`` and leaves the global ``random`` state alone.
``python -m engine.demo.task OUT_DIR [--seed N]`` writes the demo data (``write_demo_data``).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path
from typing import Any

OPS = ("copy", "reverse", "sort")
# Chatty endings some demonstrations (and preference candidates) trail; see the module docstring.
FILLERS = (" ok", "!", " ok!")
CHATTY_RATE = 0.5  # the share of demonstrations with a filler in the demo data
MIN_DIGITS, MAX_DIGITS = 3, 6
DIGITS = "0123456789"
_PROMPT = re.compile(r"(copy|reverse|sort) ([0-9]+):\s*$")


# --------------------------------------------------------------------------- gold
def parse_prompt(prompt: str) -> tuple[str, str]:
    """``"reverse 3815:"`` -> ``("reverse", "3815")``; ValueError for anything else."""
    m = _PROMPT.search(prompt.strip().lower())
    if m is None:
        raise ValueError(f"demo task: not a demo prompt: {prompt!r}")
    return m.group(1), m.group(2)


def target(prompt: str) -> str:
    """The correct response to a demo prompt."""
    op, digits = parse_prompt(prompt)
    if op == "copy":
        return digits
    if op == "reverse":
        return digits[::-1]
    return "".join(sorted(digits))


def gold_score(prompt: str, response: str) -> float:
    """Positional match with the target, in [0, 1]: ``#{i: r_i == t_i} / max(len(r), len(t))``.

    Whitespace around the response is ignored; an empty response scores 0.
    """
    t, r = target(prompt), response.strip().lower()
    if not r:
        return 0.0
    hits = sum(a == b for a, b in zip(r, t))
    return hits / max(len(r), len(t))


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """``gold_score`` in the reward-callable signature (``reward.function=engine.demo.task:gold_reward``)."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(responses)} responses")
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


# --------------------------------------------------------------------------- generators
def _prompt(rng: random.Random) -> str:
    n = rng.randint(MIN_DIGITS, MAX_DIGITS)
    return f"{rng.choice(OPS)} {''.join(rng.choice(DIGITS) for _ in range(n))}:"


def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` demo prompts, deterministic in ``seed``."""
    if n <= 0:
        raise ValueError(f"make_prompts: n must be > 0, got {n}")
    rng = random.Random(f"prompts-{seed}")
    return [_prompt(rng) for _ in range(n)]


_NOT_DIGIT = re.compile(r"[^0-9]")


def has_filler(response: str) -> bool:
    """Whether a response carries anything besides digits (a chatty filler or other junk)."""
    return bool(_NOT_DIGIT.search(response.strip()))


def digits_of(response: str) -> str:
    """The response with everything but its digits removed (what ``has_filler`` looks for)."""
    return _NOT_DIGIT.sub("", response)


def _check_rate(fn: str, chatty_rate: float) -> None:
    if not 0.0 <= chatty_rate <= 1.0:
        raise ValueError(f"{fn}: chatty_rate must be in [0, 1], got {chatty_rate}")


def _maybe_filler(text: str, chatty_rate: float, rng: random.Random) -> str:
    return text + rng.choice(FILLERS) if chatty_rate > 0 and rng.random() < chatty_rate else text


def make_sft_data(n: int, seed: int, chatty_rate: float = 0.0) -> list[dict[str, str]]:
    """``n`` demonstrations ``{"prompt", "response"}`` with the right digits.

    A ``chatty_rate`` share of them (drawn independently) ends in one of ``FILLERS``.
    """
    if n <= 0:
        raise ValueError(f"make_sft_data: n must be > 0, got {n}")
    _check_rate("make_sft_data", chatty_rate)
    rng = random.Random(f"sft-{seed}")
    chat = random.Random(f"chatty-{seed}")  # separate, so the prompts do not depend on the rate
    out = []
    for _ in range(n):
        p = _prompt(rng)
        out.append({"prompt": p, "response": _maybe_filler(target(p), chatty_rate, chat)})
    return out


def corrupt(text: str, n_edits: int, rng: random.Random) -> str:
    """``text`` after ``n_edits`` random edits (substitute, swap neighbours, delete, insert a digit)."""
    s = list(text)
    for _ in range(n_edits):
        kind = rng.choice(("sub", "sub", "swap", "del", "ins"))
        if kind == "del" and len(s) > 1:
            del s[rng.randrange(len(s))]
        elif kind == "ins" and len(s) < MAX_DIGITS + 2:
            s.insert(rng.randrange(len(s) + 1), rng.choice(DIGITS))
        elif kind == "swap" and len(s) > 1:
            i = rng.randrange(len(s) - 1)
            s[i], s[i + 1] = s[i + 1], s[i]
        else:
            i = rng.randrange(len(s))
            s[i] = rng.choice(DIGITS.replace(s[i], ""))
    return "".join(s)


def bt_probability(g_better: float, g_worse: float, bt_temperature: float) -> float:
    """P(the better response is labelled chosen) = sigmoid((g_better - g_worse) / T)."""
    return 1.0 / (1.0 + math.exp(-(g_better - g_worse) / bt_temperature))


def make_preference_data(
    n: int, seed: int, bt_temperature: float = 0.15, min_gap: float = 0.34, chatty_rate: float = 0.0
) -> list[dict[str, Any]]:
    """``n`` pairs ``{"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}``.

    For each prompt two candidates are drawn as the target with 0..L random edits
    each, then a filler with probability ``chatty_rate`` each
    (redrawn until their gold scores differ by at least ``min_gap``: "differing
    quality", as a labeller would be shown); the better one becomes
    ``chosen`` with probability ``sigmoid((g_better - g_worse) / bt_temperature)``,
    otherwise the pair is flipped (a noisy, realistic label).
    """
    if n <= 0:
        raise ValueError(f"make_preference_data: n must be > 0, got {n}")
    if not 0 <= min_gap < 1:
        raise ValueError(f"make_preference_data: min_gap must be in [0, 1), got {min_gap}")
    if not bt_temperature > 0:
        raise ValueError(f"make_preference_data: bt_temperature must be > 0, got {bt_temperature}")
    _check_rate("make_preference_data", chatty_rate)
    rng = random.Random(f"pref-{seed}")
    out: list[dict[str, Any]] = []
    while len(out) < n:
        p = _prompt(rng)
        t = target(p)
        a = _maybe_filler(corrupt(t, rng.randint(0, len(t)), rng), chatty_rate, rng)
        b = _maybe_filler(corrupt(t, rng.randint(0, len(t)), rng), chatty_rate, rng)
        ga, gb = gold_score(p, a), gold_score(p, b)
        if abs(ga - gb) < max(min_gap, 1e-9):
            continue
        (better, gbet), (worse, gwor) = sorted(((a, ga), (b, gb)), key=lambda x: -x[1])
        if rng.random() < bt_probability(gbet, gwor, bt_temperature):
            rec = {
                "prompt": p,
                "chosen": better,
                "rejected": worse,
                "gold_chosen": gbet,
                "gold_rejected": gwor,
            }
        else:
            rec = {
                "prompt": p,
                "chosen": worse,
                "rejected": better,
                "gold_chosen": gwor,
                "gold_rejected": gbet,
            }
        out.append(rec)
    return out


def label_accuracy_ceiling(pairs: list[dict[str, Any]], bt_temperature: float) -> float:
    """The expected accuracy of the gold scorer itself against the noisy labels: mean of max(p, 1 - p).

    No reward model can beat this on held-out pairs, in expectation.
    """
    ps = [
        bt_probability(
            max(r["gold_chosen"], r["gold_rejected"]),
            min(r["gold_chosen"], r["gold_rejected"]),
            bt_temperature,
        )
        for r in pairs
    ]
    return sum(ps) / len(ps)


# --------------------------------------------------------------------------- writers
def write_jsonl(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write one JSON object per line (atomically: a temp file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, p)
    return p


def write_demo_data(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_sft: int = 4000,
    n_pairs: int = 4000,
    n_prompts: int = 512,
    bt_temperature: float = 0.15,
    chatty_rate: float = CHATTY_RATE,
) -> dict[str, Path]:
    """Write ``sft.jsonl``, ``preferences.jsonl``, ``prompts.jsonl``, ``eval_prompts.jsonl`` under ``out_dir``.

    The four sets use different seeds. Also writes ``stats.json`` (sizes, the BT
    temperature, the chatty rate, the demonstrations' mean gold score and the
    label-accuracy ceiling of the preference pairs).
    """
    out = Path(out_dir)
    pairs = make_preference_data(n_pairs, seed, bt_temperature, chatty_rate=chatty_rate)
    sft = make_sft_data(n_sft, seed, chatty_rate)
    paths = {
        "sft": write_jsonl(sft, out / "sft.jsonl"),
        "preferences": write_jsonl(pairs, out / "preferences.jsonl"),
        "prompts": write_jsonl([{"prompt": p} for p in make_prompts(n_prompts, seed)], out / "prompts.jsonl"),
        "eval_prompts": write_jsonl(
            [{"prompt": p} for p in make_prompts(256, seed + 10_000)], out / "eval_prompts.jsonl"
        ),
    }
    stats = {
        "seed": seed,
        "n_sft": n_sft,
        "n_pairs": n_pairs,
        "n_prompts": n_prompts,
        "bt_temperature": bt_temperature,
        "chatty_rate": chatty_rate,
        "sft_filler_rate": sum(has_filler(r["response"]) for r in sft) / len(sft),
        "sft_gold_mean": sum(gold_score(r["prompt"], r["response"]) for r in sft) / len(sft),
        "label_accuracy_ceiling": label_accuracy_ceiling(pairs, bt_temperature),
        "label_flip_rate": sum(r["gold_chosen"] < r["gold_rejected"] for r in pairs) / len(pairs),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return paths


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write the demo task's JSONL data")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-sft", type=int, default=4000)
    ap.add_argument("--n-pairs", type=int, default=4000)
    ap.add_argument("--n-prompts", type=int, default=512)
    ap.add_argument("--bt-temperature", type=float, default=0.15)
    ap.add_argument("--chatty-rate", type=float, default=CHATTY_RATE)
    a = ap.parse_args()
    for name, path in write_demo_data(
        a.out_dir, a.seed, a.n_sft, a.n_pairs, a.n_prompts, a.bt_temperature, a.chatty_rate
    ).items():
        print(f"{name}: {path}")
