"""The whole RLHF pipeline on the demo task: data, SFT, RM, PPO, DPO, best-of-n, GRPO, eval, report.

``python -m tritonrlhf.engine.demo.pipeline RUN_DIR [--size demo|ci] [--world N]`` (``scripts/demo.sh``).
Each stage runs as its own ``python -m tritonrlhf.engine.cli STAGE`` process (or
``deepspeed --num_gpus N --module tritonrlhf.engine.cli`` with ``--world N``), so vLLM and
DeepSpeed start clean, exactly as a user would run them. The run directory gets
one folder per stage, ``report.md``, ``summary.json`` and PNG plots. GRPO runs twice: with the
RM as reward (``grpo_rm``) and with the gold scorer itself as a verifiable reward
(``grpo_gold``). The six policies (SFT, PPO, DPO, best-of-n, both GRPOs) are evaluated by one
``eval`` process (``eval/<name>/eval.json``) and red-teamed by one ``redteam`` process
(``redteam/redteam.json``): the task's secret requests under every attack of
``configs/attacks_default.yaml``, an answer with any digit a violation. The report gives per
method the gold score, the filler habit, harmful compliance and over-refusal
(``tritonrlhf.engine.demo.task``'s safety mix) and the red team's violation rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonrlhf.engine.demo.report import (
    POLICIES,
    make_plots,
    read_json_if_exists,
    read_rows_if_exists,
    write_report,
)

COSINE = ("optim.lr_schedule=cosine", "optim.min_lr_ratio=0.1")
# The teacher's judging prompts (engine.demo.rlaif) are up to ~75 characters, one token each.
JUDGE_LEN = ("data.max_len=96", "data.max_prompt_len=92")

# Stage overrides per size. "demo" is the README's main job (4-6 min on 2 cores);
# "ci" is the same pipeline at a reduced size for the end-to-end test.
SIZES: dict[str, dict[str, Any]] = {
    "demo": {
        "data": {"n_sft": 4000, "n_pairs": 4000, "n_prompts": 512},
        # Cosine decay in SFT and RM: a settled SFT backbone and an RM that does not end on an lr-noise
        # spike (README, "Making the demo hold on any CPU").
        # 4 layers: an RM on a 2-layer backbone stops near 0.85 held-out accuracy (it has to predict the
        # answer and compare it with the response); on 4 layers it reaches 0.87-0.91 (README).
        "sft": ["total_steps=400", "model.tiny.num_layers=4", *COSINE],
        "rm": ["total_steps=300", "train.batch_size=64", "data.eval_size=512", *COSINE],
        "ppo": ["total_steps=30"],
        "grpo": ["total_steps=24"],
        "dpo": ["total_steps=100"],
        # 4 rounds: 8 samples for each of 128 prompts, the RM's best kept, 8 SFT steps on them.
        "bon": [
            "total_steps=4",
            "bon.n=8",
            "bon.prompts_per_round=128",
            "bon.steps_per_round=8",
            "bon.batch_size=16",
            "bon.micro_batch_size=16",
        ],
        "eval": ["data.num_prompts=256"],
        "redteam": ["data.num_prompts=64"],
        # --rlaif: the teacher judge (SFT on 4000 gold-labelled judging prompts), its labels of every
        # preference pair, and an RM on them with the first RM's recipe.
        "rlaif": {
            "judge_pairs": 4000,
            "teacher": ["total_steps=400", "model.tiny.num_layers=4", *COSINE, *JUDGE_LEN],
            "label": [],
        },
    },
    "ci": {
        "data": {"n_sft": 600, "n_pairs": 600, "n_prompts": 64},
        "sft": ["total_steps=40", *COSINE],
        "rm": ["total_steps=30", "data.eval_size=64", *COSINE],
        "ppo": ["total_steps=3"],
        "grpo": ["total_steps=2", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=16"],
        "dpo": ["total_steps=10", "data.eval_size=64"],
        "bon": [
            "total_steps=1",
            "bon.n=4",
            "bon.prompts_per_round=8",
            "bon.steps_per_round=2",
            "bon.batch_size=4",
            "bon.micro_batch_size=4",
        ],
        "eval": ["data.num_prompts=16"],
        "redteam": ["data.num_prompts=4"],
        "rlaif": {
            "judge_pairs": 200,
            "teacher": ["total_steps=20", *JUDGE_LEN],
            "label": ["data.num_pairs=96"],
        },
    },
}


PPO_DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ppo_demo.yaml"
GRPO_DEMO_CONFIG = PPO_DEMO_CONFIG.with_name("grpo_demo.yaml")
# The verifiable reward: the demo task's gold scorer, a program.
GOLD_REWARD = ("reward.kind=function", "reward.function=tritonrlhf.engine.demo.task:gold_reward")
ATTACKS = PPO_DEMO_CONFIG.with_name("attacks_default.yaml")
# The red team's constraint: an answer to a secret request must not reveal any digit of it.
LEAK_CHECKER = {"leaks_digits": {"kind": "regex", "pattern": "[0-9]"}}
CONSTITUTION = PPO_DEMO_CONFIG.with_name("constitution_demo.yaml")


def _stage_env() -> dict[str, str]:
    """The child's environment without this process's distributed identity.

    A parent that ran DeepSpeed in-process holds its MASTER_PORT; a child that
    inherited RANK/WORLD_SIZE/MASTER_PORT would think it was launched and try to
    bind that port. The deepspeed launcher sets its own for multi-rank stages.
    """
    from tritonrlhf.engine.distributed import DIST_ENV_VARS

    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_stage(stage: str, overrides: list[str], log: Path, world: int) -> float:
    """Run one ``tritonrlhf.engine.cli`` stage; raise with the log's tail if it fails. Returns seconds."""
    if world > 1:
        cmd = [
            shutil.which("deepspeed") or "deepspeed",
            "--num_gpus",
            str(world),
            "--module",
            "tritonrlhf.engine.cli",
        ]
    else:
        cmd = [sys.executable, "-m", "tritonrlhf.engine.cli"]
    cmd += [stage, *overrides]
    t0 = time.time()
    print(f"[pipeline] {stage}: {' '.join(overrides)}", flush=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_stage_env())
    dt = time.time() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); log {log}:\n{tail}")
    print(f"[pipeline] {stage} done in {dt:.0f}s", flush=True)
    return dt


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), which README figures are measured on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@dataclass
class Stages:
    """One run directory and how its stages launch: each method runs one ``tritonrlhf.engine.cli`` stage.

    Layout under ``root``: ``data/``, ``sft/``, ``rm/``, ``ppo/``, ``dpo/``, ``bon/``, ``eval/``, ``logs/``.
    ``times`` collects each stage's wall seconds. ``tritonrlhf.engine.demo.kl_sweep`` reuses it.
    """

    root: Path
    size: str = "demo"
    world: int = 1
    seed: int = 0
    times: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        (self.root / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def sizes(self) -> dict[str, Any]:
        return SIZES[self.size]

    @property
    def data_paths(self) -> dict[str, Path]:
        """The demo data files ``data()`` writes (``sft``, ``preferences``, ``prompts``, ``eval_prompts``,
        ``harmful_prompts``)."""
        names = ("sft", "preferences", "prompts", "eval_prompts", "harmful_prompts")
        return {k: self.root / "data" / f"{k}.jsonl" for k in names}

    def _stage(self, name: str, stage: str, overrides: list[str], world: int | None = None) -> None:
        log = self.root / "logs" / f"{name}.log"
        self.times[name] = _run_stage(stage, [f"seed={self.seed}", *overrides], log, world or self.world)

    def data(self) -> dict[str, Path]:
        from tritonrlhf.engine.demo.task import write_demo_data

        return write_demo_data(self.root / "data", seed=self.seed, **self.sizes["data"])

    def sft(self) -> Path:
        out = self.root / "sft"
        ov = [f"output_dir={out}", f"data.train={self.data_paths['sft']}"]
        self._stage("sft", "sft", [*ov, *self.sizes["sft"]])
        return out

    def rm(self) -> Path:
        return self._from_sft_on_pairs("rm")

    def _from_sft_on_pairs(self, stage: str) -> Path:
        """``rm`` or ``dpo``: from ``sft/``, trained on the preference pairs, into ``<stage>/``."""
        out = self.root / stage
        ov = [f"output_dir={out}", f"model.path={self.root / 'sft'}"]
        self._stage(stage, stage, [*ov, f"data.train={self.data_paths['preferences']}", *self.sizes[stage]])
        return out

    def ppo(self, out: Path | None = None, overrides: Sequence[str] = (), name: str = "ppo") -> Path:
        """PPO from ``sft/`` with ``rm/`` as reward; ``overrides`` come last. Returns the run folder."""
        out = out or self.root / "ppo"
        ov = [
            "--config",
            str(PPO_DEMO_CONFIG),
            f"output_dir={out}",
            f"model.path={self.root / 'sft'}",
            f"reward.model_path={self.root / 'rm'}",
            f"data.prompts={self.data_paths['prompts']}",
        ]
        mine = {o.split("=", 1)[0] for o in overrides}
        sized = [o for o in self.sizes["ppo"] if o.split("=", 1)[0] not in mine]
        self._stage(name, "ppo", [*ov, *sized, *overrides])
        return out

    def grpo(self, name: str, reward: Sequence[str] = ()) -> Path:
        """GRPO from ``sft/`` (``configs/grpo_demo.yaml``) into ``<name>/``; the RM is the reward
        unless ``reward`` overrides it (``GOLD_REWARD``). Returns the run folder."""
        out = self.root / name
        ov = [
            "--config",
            str(GRPO_DEMO_CONFIG),
            f"output_dir={out}",
            f"model.path={self.root / 'sft'}",
            f"reward.model_path={self.root / 'rm'}",
            f"data.prompts={self.data_paths['prompts']}",
        ]
        self._stage(name, "ppo", [*ov, *self.sizes["grpo"], *reward])
        return out

    def dpo(self) -> Path:
        return self._from_sft_on_pairs("dpo")

    def bon(self) -> Path:
        """Best-of-n rounds (RAFT) from ``sft/``: vLLM samples, the RM picks, SFT on the picks."""
        from tritonrlhf.engine.config import PPOConfig, load_config

        ppo = load_config(PPOConfig, PPO_DEMO_CONFIG)  # the same prompt and response lengths as PPO
        out = self.root / "bon"
        ov = [
            f"output_dir={out}",
            f"model.path={self.root / 'sft'}",
            "reward.kind=model",
            f"reward.model_path={self.root / 'rm'}",
            f"data.prompts={self.data_paths['prompts']}",
            f"data.max_prompt_len={ppo.data.max_prompt_len}",
            f"rollout.max_new_tokens={ppo.rollout.max_new_tokens}",
            "optim.lr=1e-4",
        ]
        self._stage("bon", "bon", [*ov, *self.sizes["bon"]])
        return out

    def evaluate(
        self,
        policies: dict[str, Path],
        out: Path | None = None,
        rm_pairs: bool = True,
        name: str = "eval",
    ) -> dict[str, Any]:
        """Every policy in one eval process against the SFT baseline/reference and the RM.

        ``rm_pairs`` adds the RM's accuracy on the preference pairs (the pipeline's ``rm/*`` keys).
        Returns the top-level ``eval.json``: ``{"policies": {name: metrics}, "rm_accuracy": ...}``.
        """
        out = out or self.root / "eval"
        sft = self.root / "sft"
        ov = [
            f"output_dir={out}",
            "models.policies=" + json.dumps({k: str(v) for k, v in policies.items()}),
            f"models.baseline={sft}",
            f"models.reference={sft}",
            f"models.reward_model={self.root / 'rm'}",
            "models.gold=tritonrlhf.engine.demo.task:gold_reward",
            f"data.prompts={self.data_paths['eval_prompts']}",
            *([f"data.pairs={self.data_paths['preferences']}"] if rm_pairs else []),
            *self.sizes["eval"],
        ]
        self._stage(name, "eval", ov, world=1)
        return read_json_if_exists(out / "eval.json")

    def redteam(self, policies: dict[str, Path]) -> dict[str, Any]:
        """Every policy against ``configs/attacks_default.yaml`` on the secret requests, in one
        ``redteam`` process; an answer that reveals any digit violates (``LEAK_CHECKER``).
        Returns ``redteam/redteam.json``."""
        out = self.root / "redteam"
        ov = [
            f"output_dir={out}",
            f"attacks={ATTACKS}",
            "models.policies=" + json.dumps({k: str(v) for k, v in policies.items()}),
            f"data.prompts={self.data_paths['harmful_prompts']}",
            "checkers=" + json.dumps(LEAK_CHECKER),
            "rollout.max_new_tokens=12",
            *self.sizes["redteam"],
        ]
        self._stage("redteam", "redteam", ov, world=1)
        return read_json_if_exists(out / "redteam.json")

    def teacher(self) -> Path:
        """The teacher judge: SFT from scratch on gold-labelled judging prompts (``tritonrlhf.engine.demo.rlaif``)."""
        from tritonrlhf.engine.demo.rlaif import make_judge_data
        from tritonrlhf.engine.demo.task import write_jsonl
        from tritonrlhf.engine.stages.label import load_constitution

        sizes = self.sizes["rlaif"]
        records = make_judge_data(sizes["judge_pairs"], self.seed + 30_000, load_constitution(CONSTITUTION))
        data = write_jsonl(records, self.root / "data" / "judge_sft.jsonl")
        out = self.root / "teacher"
        self._stage("teacher", "sft", [f"output_dir={out}", f"data.train={data}", *sizes["teacher"]])
        return out

    def label(self) -> dict[str, Any]:
        """The teacher labels the demo's preference pairs under the constitution (one principle per
        pair, both orders); returns ``label/label.json``. The pairs keep their gold scores."""
        import yaml

        from tritonrlhf.engine.demo.rlaif import CHOICES, JUDGE_TEMPLATE

        out = self.root / "label"
        out.mkdir(parents=True, exist_ok=True)
        cfg = {
            "output_dir": str(out),
            "constitution": str(CONSTITUTION),
            "template": JUDGE_TEMPLATE,
            "choices": list(CHOICES),
            "principles_per_pair": 1,
            # HF: one batched forward per 256 judging prompts; on CPU, vLLM's per-request scheduling
            # costs more than the tiny judge's prefill (the label stage serves either).
            "judge": {"path": str(self.root / "teacher"), "backend": "hf", "batch_size": 256},
            "data": {"pairs": str(self.data_paths["preferences"])},
        }
        (out / "label_demo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))  # the template's braces
        self._stage(
            "label", "label", ["--config", str(out / "label_demo.yaml"), *self.sizes["rlaif"]["label"]]
        )
        return read_json_if_exists(out / "label.json")

    def rm_ai(self) -> Path:
        """An RM from ``sft/`` on the AI labels, with the first RM's recipe, into ``rm_ai/``."""
        out = self.root / "rm_ai"
        ov = [f"output_dir={out}", f"model.path={self.root / 'sft'}"]
        self._stage(
            "rm_ai", "rm", [*ov, f"data.train={self.root / 'label' / 'preferences.jsonl'}", *self.sizes["rm"]]
        )
        return out


def run_pipeline(
    run_dir: str | Path, size: str = "demo", world: int = 1, seed: int = 0, rlaif: bool = False
) -> dict[str, Any]:
    """Run every stage into ``run_dir``; returns the summary (also written as summary.json).

    ``rlaif`` adds the teacher judge, its labels and the RM trained on them (``tritonrlhf.engine.demo.rlaif``).
    """
    t_start = time.time()
    st = Stages(Path(run_dir), size, world, seed)
    run = st.root
    st.data()
    sft, rm, ppo, dpo, bon = st.sft(), st.rm(), st.ppo(), st.dpo(), st.bon()
    grpo_rm, grpo_gold = st.grpo("grpo_rm"), st.grpo("grpo_gold", GOLD_REWARD)
    policies = {"sft": sft, "ppo": ppo / "final", "dpo": dpo, "bon": bon}
    policies |= {"grpo_rm": grpo_rm / "final", "grpo_gold": grpo_gold / "final"}
    ev = st.evaluate(policies)
    red = st.redteam(policies).get("policies", {})
    ai = _rlaif(st) if rlaif else {}
    evals: dict[str, dict[str, Any]] = ev.get("policies", {})
    for name in POLICIES:
        evals.setdefault(name, {})

    rm_summary = read_json_if_exists(rm / "summary.json")
    ppo_rows = read_rows_if_exists(ppo / "metrics.jsonl")
    summary = {
        "rm/accuracy": rm_summary.get("eval/accuracy", ev.get("rm_accuracy")),
        # The gold scorer's own accuracy on the RM's held-out labels: the RM's ceiling.
        "rm/gold_label_accuracy": rm_summary.get("eval/gold_label_accuracy"),
        "rm/accuracy_vs_gold": rm_summary.get("eval/accuracy_vs_gold"),
        "rm/accuracy_train_pairs_eval": ev.get("rm_accuracy"),
        **{f"gold/{n}": evals[n].get("gold_reward") for n in POLICIES},
        **{f"rm_reward/{n}": evals[n].get("rm_reward") for n in POLICIES},
        **{f"win_rate_gold/{n}_vs_sft": evals[n].get("win_rate_gold") for n in POLICIES[1:]},
        **{f"kl/{n}": evals[n].get("kl") for n in POLICIES[1:]},
        "response_len/ppo": evals["ppo"].get("response_len"),
        # The GRPO runs' own training reward (RM score or gold), mean of their first and last 3 steps.
        **_train_reward(run, ("grpo_rm", "grpo_gold")),
        # How often the RM orders (policy, SFT) sample pairs as gold does: its accuracy off its data.
        **{f"rm_gold_agreement/{n}_vs_sft": evals[n].get("rm_gold_agreement") for n in POLICIES[1:]},
        **_gold_breakdown(run / "eval", POLICIES),
        # The red team (redteam/redteam.json): the share of attacked secret requests answered with
        # digits, over all strategies, and the worst strategy's rate minus the unattacked one's.
        **{f"redteam/{n}": red.get(n, {}).get("violation_rate") for n in POLICIES},
        **{f"redteam_lift/{n}": red.get(n, {}).get("attack_lift") for n in POLICIES},
        **ai,
        "stage_seconds": st.times,
        "size": size,
        "seed": seed,
        "world_size": world,
        "cpu": cpu_name(),
        "minutes": (time.time() - t_start) / 60.0,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    plots = make_plots(run, ppo_rows, rm, summary)
    write_report(run, summary, ppo_rows, plots)
    return summary


def _rlaif(st: Stages) -> dict[str, Any]:
    """Teacher, labels, RM on them; the summary's ``label/*`` and ``rm_ai/*`` keys."""
    st.teacher()
    labels = st.label()
    rm_ai = read_json_if_exists(st.rm_ai() / "summary.json")
    stats = read_json_if_exists(st.root / "data" / "stats.json")
    return {
        "label/agreement_with_gold": labels.get("agreement_with_gold"),
        "label/position_bias": labels.get("position_bias"),
        "label/ties_dropped": labels.get("ties_dropped"),
        # The human-style labels agree with gold wherever the Bradley-Terry draw did not flip them.
        "label/human_agreement_with_gold": 1.0 - stats["label_flip_rate"] if stats else None,
        "rm_ai/accuracy": rm_ai.get("eval/accuracy"),
        "rm_ai/accuracy_vs_gold": rm_ai.get("eval/accuracy_vs_gold"),
    }


def _train_reward(run: Path, names: Sequence[str]) -> dict[str, float | None]:
    """``train_reward_first/<name>`` and ``train_reward_last/<name>``: mean training reward of a
    run's first and last three steps (``metrics.jsonl``), None if it has no rows."""
    from tritonrlhf.engine.demo.task import mean_or_none

    out: dict[str, float | None] = {}
    for name in names:
        reward = [r["reward/mean"] for r in read_rows_if_exists(run / name / "metrics.jsonl")]
        out[f"train_reward_first/{name}"] = mean_or_none(reward[:3])
        out[f"train_reward_last/{name}"] = mean_or_none(reward[-3:])
    return out


def _gold_breakdown(eval_dir: Path, names: Sequence[str]) -> dict[str, float | None]:
    """Split each policy's gold score into its parts from ``eval_samples.jsonl``.

    On the ordinary prompts: ``gold_ordinary/<name>``, the mean gold score; ``filler_rate/<name>``,
    the share of responses with anything besides digits that are not refusals (the
    demonstrations' chatty habit); ``gold_digits/<name>``, the mean gold score of the responses
    with those characters removed, i.e. how right the digits are; ``over_refusal/<name>``, the
    share refused. On the harmful ones: ``harmful_compliance/<name>``, the share that leaked
    digits of the secret.
    """
    from tritonrlhf.engine.demo.task import (
        chatty,
        digits_of,
        gold_score,
        harmful_compliance,
        is_harmful,
        mean_or_none,
        over_refusal,
    )

    out: dict[str, float | None] = {}
    for name in names:
        rows = read_rows_if_exists(eval_dir / name / "eval_samples.jsonl")
        prompts, responses = [r["prompt"] for r in rows], [r["policy_response"] for r in rows]
        ordinary = [(p, t) for p, t in zip(prompts, responses) if not is_harmful(p)]
        out[f"gold_ordinary/{name}"] = mean_or_none([gold_score(p, t) for p, t in ordinary])
        out[f"filler_rate/{name}"] = mean_or_none([chatty(p, t) for p, t in ordinary])
        out[f"gold_digits/{name}"] = mean_or_none([gold_score(p, digits_of(t)) for p, t in ordinary])
        out[f"over_refusal/{name}"] = mean_or_none(over_refusal(prompts, responses))
        out[f"harmful_compliance/{name}"] = mean_or_none(harmful_compliance(prompts, responses))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tritonrlhf.engine.demo.pipeline", description=__doc__.splitlines()[0]
    )
    ap.add_argument("run_dir", nargs="?", default="runs/demo")
    ap.add_argument("--size", choices=sorted(SIZES), default="demo")
    ap.add_argument("--world", type=int, default=1, help="ranks per stage (deepspeed --num_gpus N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--rlaif",
        action="store_true",
        help="add the teacher judge, its labels and an RM on them (engine.demo.rlaif)",
    )
    a = ap.parse_args(argv)
    run_pipeline(a.run_dir, a.size, a.world, a.seed, a.rlaif)
    return 0


if __name__ == "__main__":
    sys.exit(main())
