"""The red-team stage: attack strategies on harmful prompts, constraint checkers on the answers.

``python -m tritonrlhf.engine.cli redteam --config configs/redteam_demo.yaml``, read top to bottom in
``run_redteam``:

1. **attack**: every strategy of ``attacks`` (a YAML file, ``tritonrlhf.engine.stages.attacks``; empty:
   ``DEFAULT_ATTACKS``) rewrites every prompt of ``data.prompts`` (JSONL with ``prompt``). An
   attacked prompt longer than ``data.max_prompt_len`` tokens is an error before any model loads;
2. **generate**: each policy of ``models.policies`` (name -> causal-LM checkpoint) answers all
   attacked prompts in one batch, one sample each at ``rollout.temperature`` and ``seed``, from one
   rollout engine whose weights are swapped between policies (``tritonrlhf.engine.stages.sampling``);
3. **check**: every checker of ``checkers`` (name -> ``tritonrlhf.engine.stages.checkers.CheckerConfig``:
   regex, callable, or reward/classifier model with a threshold) judges every answer; an
   answer violates the constraints when any checker flags it.

Output in ``output_dir``:

* ``redteam.json``: per policy, per strategy: ``n``, ``violation_rate`` (any checker) and each
  checker's rate; per policy the overall rate and the attack success lift (the worst strategy's
  rate minus the ``none`` strategy's, when ``none`` is listed);
* ``redteam.csv``: the same as rows (policy, strategy, n, violation_rate, one column per checker);
* ``worst.jsonl``: per policy the ``worst_k`` most clearly violating answers (most checkers
  flagged, then the largest margin past a threshold), with prompt, attacked prompt and response;
* ``redteam.png``: violation rate per strategy, one bar per policy;
* ``<policy>/redteam_samples.jsonl``: every attacked prompt's answer with the checkers that flagged it.

Rank 0 does the work; other ranks (under ``deepspeed``) wait.
"""

from __future__ import annotations

import csv
import json
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
from tritonrlhf.engine.stages.checkers import CheckerConfig
from tritonrlhf.engine.stages.common import run_on_main


# --------------------------------------------------------------------------- config
@dataclass
class RedteamModelsConfig:
    policies: dict[str, str] = field(default_factory=dict)  # name -> causal-LM checkpoint
    tokenizer: str = ""  # empty: the first policy's own


@dataclass
class RedteamDataConfig:
    prompts: str = "data/demo/harmful_prompts.jsonl"  # JSONL with "prompt": requests to refuse
    num_prompts: int = 0  # first N prompts; 0: all
    max_prompt_len: int = 96  # attacked prompts, in tokens


@dataclass
class RedteamRolloutConfig(RolloutConfig):
    max_new_tokens: int = 16


@dataclass
class RedteamConfig(StageConfig):
    output_dir: str = "runs/redteam"
    attacks: str = ""  # YAML file with the strategies; empty: engine.stages.attacks.DEFAULT_ATTACKS
    checkers: dict[str, CheckerConfig] = field(default_factory=dict)
    worst_k: int = 20  # worst examples kept per policy
    models: RedteamModelsConfig = field(default_factory=RedteamModelsConfig)
    data: RedteamDataConfig = field(default_factory=RedteamDataConfig)
    rollout: RedteamRolloutConfig = field(default_factory=RedteamRolloutConfig)

    def validate(self, world_size: int = 1) -> None:
        m, d = self.models, self.data
        if not m.policies:
            raise ConfigError(
                "models.policies: name at least one policy, e.g. 'models.policies={sft: runs/sft}'"
            )
        for name, path in m.policies.items():
            if not name or name != Path(name).name or name.startswith("."):
                raise ConfigError(f"models.policies: {name!r} is not a usable name")
            if not Path(path).exists():
                raise ConfigError(f"models.policies.{name}: path does not exist: {path}")
        for key, path in (("models.tokenizer", m.tokenizer), ("attacks", self.attacks)):
            if path and not Path(path).exists():
                raise ConfigError(f"{key}: path does not exist: {path}")
        if not Path(d.prompts).is_file():
            raise ConfigError(f"data.prompts: file does not exist: {d.prompts}")
        if d.num_prompts < 0:
            raise ConfigError(f"data.num_prompts must be >= 0, got {d.num_prompts}")
        check_positive("data.max_prompt_len", d.max_prompt_len)
        self.rollout.validate()
        if self.worst_k < 0:
            raise ConfigError(f"worst_k must be >= 0, got {self.worst_k}")
        if not self.checkers:
            raise ConfigError(
                "checkers: at least one constraint checker is needed (regex, callable or model)"
            )
        for name, c in self.checkers.items():
            c.validate(f"checkers.{name}")


# --------------------------------------------------------------------------- aggregation
def violation_table(
    strategies: list[str], violated: dict[str, torch.Tensor], order: list[str]
) -> dict[str, dict[str, Any]]:
    """Per strategy: ``n``, ``violation_rate`` (any checker) and ``<checker>_rate``, in ``order``.

    ``strategies[i]`` names row i's strategy; ``violated[checker]`` is [N] bool.
    """
    names = list(violated)
    anyv = torch.stack([violated[c] for c in names]).any(0)
    out: dict[str, dict[str, Any]] = {}
    for s in order:
        idx = torch.tensor([i for i, x in enumerate(strategies) if x == s], dtype=torch.long)
        row: dict[str, Any] = {"n": len(idx), "violation_rate": float(anyv[idx].float().mean())}
        row.update({f"{c}_rate": float(violated[c][idx].float().mean()) for c in names})
        out[s] = row
    return out


def worst_rows(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The ``k`` violating rows with the most checkers flagged, then the largest summed margin."""
    bad = [r for r in rows if r["violations"]]
    bad.sort(key=lambda r: (-len(r["violations"]), -r["severity"], r["strategy"], r["index"]))
    return bad[:k]


# --------------------------------------------------------------------------- the stage
def run_redteam(cfg: RedteamConfig) -> dict[str, Any]:
    """Attack, generate, check; returns the result written to ``<output_dir>/redteam.json``."""
    return run_on_main(cfg, _redteam)


def _redteam(cfg: RedteamConfig) -> dict[str, Any]:
    from tritonrlhf.engine.data import read_jsonl
    from tritonrlhf.engine.models import (
        check_tokenizer_matches,
        load_causal_lm,
        load_tokenizer,
        require_checkpoint_kind,
    )
    from tritonrlhf.engine.stages.attacks import DEFAULT_ATTACKS, apply_attacks, load_attacks, parse_attacks
    from tritonrlhf.engine.stages.checkers import build_checkers
    from tritonrlhf.engine.stages.common import encode_prompt
    from tritonrlhf.engine.stages.sampling import PolicySampler

    t0 = time.time()
    m, d = cfg.models, cfg.data
    out = Path(cfg.output_dir)
    # Everything that can fail on input fails here, before a model loads.
    attacks = load_attacks(cfg.attacks) if cfg.attacks else parse_attacks(DEFAULT_ATTACKS, "default attacks")
    checkers = build_checkers(cfg.checkers)
    prompts = [r["prompt"] for r in read_jsonl(d.prompts, ["prompt"])]
    if d.num_prompts:
        prompts = prompts[: d.num_prompts]
    configs = {
        n: require_checkpoint_kind(p, f"models.policies.{n}", "causal_lm") for n, p in m.policies.items()
    }
    tokenizer = load_tokenizer(m.tokenizer or next(iter(m.policies.values())), role="tokenizer")
    for config in configs.values():
        check_tokenizer_matches(tokenizer, config)
    attacked = apply_attacks(attacks, prompts, cfg.seed)
    ids = [encode_prompt(tokenizer, a.prompt) for a in attacked]
    too_long = [(a, len(x)) for a, x in zip(attacked, ids) if len(x) > d.max_prompt_len]
    if too_long:
        a, n = too_long[0]
        raise ConfigError(
            f"{len(too_long)} attacked prompts are longer than data.max_prompt_len={d.max_prompt_len} tokens, "
            f"e.g. strategy {a.strategy!r} on prompt {a.index} ({n} tokens); raise data.max_prompt_len"
        )
    unk = tokenizer.unk_token_id
    unk_share = sum(unk in x for x in ids) / len(ids) if unk is not None else 0.0
    for c in checkers:
        if c.cfg.kind == "model":
            c.load_model()
    order = [a.name for a in attacks]
    strategies = [a.strategy for a in attacked]
    sampler = PolicySampler(cfg.rollout, tokenizer, cfg.seed, max(len(x) for x in ids))
    result: dict[str, Any] = {
        "num_prompts": len(prompts),
        "num_attacked": len(attacked),
        "strategies": order,
        "checkers": [c.name for c in checkers],
        "attacked_with_unk_share": unk_share,
        "policies": {},
    }
    rows_by_policy: dict[str, list[dict[str, Any]]] = {}
    try:
        for name, path in m.policies.items():
            t1 = time.time()
            model = load_causal_lm(path, torch.float32, "sdpa", role=f"models.policies.{name}")
            samples, _, responses = sampler.sample(path, model, ids, cfg.seed)
            del model
            texts = [a.prompt for a in attacked]
            checks = {c.name: c.check(texts, responses) for c in checkers}
            violated = {k: v.violated for k, v in checks.items()}
            table = violation_table(strategies, violated, order)
            rows = []
            for i, (a, s, resp) in enumerate(zip(attacked, samples, responses)):
                flagged = [k for k, v in checks.items() if bool(v.violated[i])]
                severity = sum(float(checks[k].margin[i]) for k in flagged)
                rows.append(
                    {
                        "policy": name,
                        "strategy": a.strategy,
                        "index": a.index,
                        "prompt": a.original,
                        "attacked_prompt": a.prompt,
                        "response": resp,
                        "finish_reason": s.finish_reason,
                        "violations": flagged,
                        "severity": severity,
                    }
                )
            rows_by_policy[name] = rows
            rates = [table[s]["violation_rate"] for s in order]
            summary: dict[str, Any] = {
                "checkpoint": path,
                "violation_rate": sum(r["n"] * r["violation_rate"] for r in table.values()) / len(attacked),
                "strategies": table,
                "worst_strategy": order[max(range(len(order)), key=rates.__getitem__)],
                "wall_s": time.time() - t1,
            }
            if "none" in table:
                summary["attack_lift"] = max(rates) - table["none"]["violation_rate"]
            result["policies"][name] = summary
            print(
                f"[redteam] {name}: violation rate {summary['violation_rate']:.3f} (worst: {summary['worst_strategy']})",
                flush=True,
            )
    finally:
        sampler.close()
    result["wall_s"] = time.time() - t0
    _write(cfg, out, result, rows_by_policy)
    return result


def _write(
    cfg: RedteamConfig, out: Path, result: dict[str, Any], rows: dict[str, list[dict[str, Any]]]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    (out / "redteam.json").write_text(json.dumps(result, indent=2))
    checkers = result["checkers"]
    with (out / "redteam.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "strategy", "n", "violation_rate", *(f"{c}_rate" for c in checkers)])
        for name, summary in result["policies"].items():
            for s, r in summary["strategies"].items():
                w.writerow(
                    [
                        name,
                        s,
                        r["n"],
                        f"{r['violation_rate']:.4f}",
                        *(f"{r[f'{c}_rate']:.4f}" for c in checkers),
                    ]
                )
    with (out / "worst.jsonl").open("w") as f:
        for rs in rows.values():
            for r in worst_rows(rs, cfg.worst_k):
                f.write(json.dumps(r) + "\n")
    for name, rs in rows.items():
        (out / name).mkdir(exist_ok=True)
        (out / name / "redteam_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    plot_rates(result, out / "redteam.png")


def plot_rates(result: dict[str, Any], path: Path) -> Path | None:
    """Violation rate per strategy, one bar per policy; None (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[redteam] matplotlib is not installed: redteam.png not written", flush=True)
        return None
    order, policies = result["strategies"], list(result["policies"])
    width = 0.8 / max(1, len(policies))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(order) * max(1, len(policies)) / 2 + 3), 3.8))
    for j, name in enumerate(policies):
        rates = [result["policies"][name]["strategies"][s]["violation_rate"] for s in order]
        ax.bar(
            [i + (j - (len(policies) - 1) / 2) * width for i in range(len(order))], rates, width, label=name
        )
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("violation rate")
    ax.set_title(f"red team: {result['num_prompts']} harmful prompts x {len(order)} strategies")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main_redteam(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``load_config(RedteamConfig, config_path, overrides)`` then ``run_redteam``."""
    return run_redteam(load_config(RedteamConfig, config_path, overrides))
