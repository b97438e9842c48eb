"""The whole path on each tiny model family: SFT, RM, PPO with vLLM weight swaps, DPO and eval.

One run (a module-scoped fixture, one process: ``_scripts/family_run.py``) goes through every
stage of the real CLI for each family the default Llama tests do not cover: tied Llama, tied
Qwen2 (q/k/v biases) and Qwen3 (q/k norms) with grouped-query attention (4 heads, 2 KV heads),
and Mistral. The checks read what each stage wrote. The one that only a working system passes:
after every weight swap vLLM's log-probs of the sampled tokens equal the trainer's to fp32 noise,
while PPO changes every parameter.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import GAP_TOL_FP32
from tests.engine._scripts.launch import free_port, run

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "_scripts" / "family_run.py"
sys.path.insert(0, str(SCRIPT.parent))
from family_run import PPO_STEPS  # noqa: E402

GAP_TOL = GAP_TOL_FP32  # fp32 vLLM vs trainer log-probs of the samples
GQA = "hidden_size=128,num_heads=4,num_kv_heads=2"
# name -> (model.tiny overrides, model_type, tied, a tensor only that family has)
FAMILIES = {
    "llama_tied": ("family=llama,tie_word_embeddings=true", "llama", True, None),
    "qwen2_tied": (f"family=qwen2,tie_word_embeddings=true,{GQA}", "qwen2", True, "self_attn.q_proj.bias"),
    "qwen3": (f"family=qwen3,{GQA}", "qwen3", False, "self_attn.q_norm.weight"),
    "mistral": ("family=mistral", "mistral", False, None),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    for mod in ("vllm", "deepspeed"):
        pytest.importorskip(mod)
    root = tmp_path_factory.mktemp("families")
    specs = [f"{name}={over}" for name, (over, *_) in FAMILIES.items()]
    t0 = time.perf_counter()
    port = free_port()
    proc = run(
        [sys.executable, str(SCRIPT), str(root), *specs], 1500, port=port, VLLM_ENABLE_V1_MULTIPROCESSING="0"
    )
    print(f"families: {time.perf_counter() - t0:.0f}s, exit {proc.returncode}")
    (root / "output.log").write_text(proc.stdout)
    return root


def _family(runs: Path, name: str) -> Path:
    out = runs / name
    status = json.loads((out / "status.json").read_text()) if (out / "status.json").is_file() else None
    log = (runs / "output.log").read_text()[-6000:]
    assert status is not None, f"{name} did not run:\n{log}"
    assert status["rc"] == 0, f"{name} failed: {status.get('error') or log}"
    print(name, json.loads((out / "times.json").read_text()))
    return out


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_sft_and_rm_build_the_family(runs, name):
    _, model_type, tied, own = FAMILIES[name]
    out = _family(runs, name)
    sft = json.loads((out / "sft" / "config.json").read_text())
    assert sft["model_type"] == model_type and sft["tie_word_embeddings"] is tied
    assert sft["architectures"][0].endswith("ForCausalLM")
    weights = _tensors(out / "sft")
    assert ("lm_head.weight" in weights) is not tied  # a tied head is saved once, as the embedding
    assert own is None or f"model.layers.0.{own}" in weights
    summary = json.loads((out / "sft" / "summary.json").read_text())
    assert summary["steps"] > 0 and math.isfinite(summary["train/loss_last"])
    rm = json.loads((out / "rm" / "config.json").read_text())
    assert rm["model_type"] == model_type and rm["architectures"][0].endswith("ForSequenceClassification")
    assert math.isfinite(json.loads((out / "rm" / "summary.json").read_text())["eval/accuracy"])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_ppo_vllm_follows_every_swap(runs, name):
    """Every step's rollout came from the previous update's weights, pushed into the running vLLM
    engine, and vLLM's log-probs equal the trainer's to fp32 noise; PPO moved every tensor."""
    out = _family(runs, name)
    rows = _rows(out / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, PPO_STEPS + 1))
    for r in rows:
        assert r["rollout/policy_version"] == r["step"] - 1
        assert r["rollout/logprob_gap"] < GAP_TOL, f"step {r['step']}: gap {r['rollout/logprob_gap']:.2e}"
    print(name, "gaps", [f"{r['rollout/logprob_gap']:.1e}" for r in rows])
    init, final = _tensors(out / "sft"), _tensors(out / "ppo" / "final")
    assert set(final) == set(init)
    assert all(not torch.equal(final[k], init[k]) for k in init), "PPO left a tensor unchanged"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_dpo_and_eval_run_on_the_family(runs, name):
    _, model_type, *_ = FAMILIES[name]
    out = _family(runs, name)
    assert json.loads((out / "dpo" / "config.json").read_text())["model_type"] == model_type
    init, dpo = _tensors(out / "sft"), _tensors(out / "dpo")
    assert any(not torch.equal(dpo[k], init[k]) for k in init), "DPO changed nothing"
    ev = json.loads((out / "eval" / "eval.json").read_text())["policies"]
    assert set(ev) == {"ppo", "dpo"}
    for pol, m in ev.items():
        assert m["num_prompts"] == 4 and m["response_len"] > 0, pol
        assert all(math.isfinite(m[k]) for k in ("kl", "rm_reward", "gold_reward")), (pol, m)
    # 4 PPO steps at lr 5e-3 move further from the SFT weights than 2 DPO steps. (Measured on the
    # weights: eval's KL is a 4-sample estimate, whose per-sequence terms here spread over +-2.6
    # nats, so its sign is noise; qwen2_tied's PPO came out at -0.62 once the sampling seeds changed.)
    ppo = _tensors(out / "ppo" / "final")

    def moved(tensors: dict) -> float:
        return sum(float((tensors[k].float() - init[k].float()).pow(2).sum()) for k in init)

    assert moved(ppo) > moved(dpo)
