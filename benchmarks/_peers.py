"""What the peer comparisons share: the random Llamas both systems load, and a peer's own environment.

``bench_grpo.py`` (TRL's ``GRPOTrainer``) and ``bench_ppo.py --peer trl`` (TRL's ``PPOTrainer``)
save one random model with :func:`build_model`, give its directory to our CLI and to a peer script
under ``benchmarks/peers/``, and run that script with :func:`run_peer` in the peer's own virtual
environment made by :func:`peer_python` (``benchmarks/.peer_venvs/<package>-<version>``,
git-ignored, made once; the engine's ``.venv`` is never touched).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_VENVS = ROOT / "benchmarks" / ".peer_venvs"
PEER_SCRIPTS = ROOT / "benchmarks" / "peers"
# Random Llamas built from configs (the toy tokenizer's vocabulary of 64). "small" is issue #16's
# PPO size (3.2M parameters), where compute starts to count on 2 cores; "medium" is about 10M.
MODELS = {
    "tiny": {  # 0.41M parameters
        "hidden_size": 128,
        "num_layers": 2,
        "num_heads": 2,
        "num_kv_heads": 2,
        "intermediate_size": 344,
    },
    "small": {  # 3.2M
        "hidden_size": 256,
        "num_layers": 4,
        "num_heads": 8,
        "num_kv_heads": 8,
        "intermediate_size": 688,
    },
    "medium": {  # 10.7M
        "hidden_size": 384,
        "num_layers": 6,
        "num_heads": 6,
        "num_kv_heads": 6,
        "intermediate_size": 1024,
    },
}


def build_model(out: Path, seed: int, size: str = "tiny", vocab: int = 64) -> int:
    """The random Llama of ``MODELS[size]`` and the toy tokenizer saved to ``out``; returns the
    parameter count. ``vocab`` > 64 (a multiple of 64): the toy tokenizer with ``vocab - 64``
    two-letter merges, so the model has that many embedding and LM-head rows."""
    from tritonrlhf.engine.config import TinyModelConfig
    from tritonrlhf.engine.models import TOY_VOCAB_SIZE, build_tiny_model, build_tokenizer

    if vocab < TOY_VOCAB_SIZE or vocab % 64:
        raise ValueError(f"vocab must be a multiple of 64 from {TOY_VOCAB_SIZE}, got {vocab}")
    tok = build_tokenizer(merges=vocab - TOY_VOCAB_SIZE)
    model = build_tiny_model(tok, TinyModelConfig(**MODELS[size], max_position_embeddings=256), seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def build_reward_model(policy_dir: Path, out: Path, seed: int) -> None:
    """A one-output sequence classifier (``num_labels=1``) on ``policy_dir``'s backbone, saved to ``out``.

    Its ``score`` head is random (seeded); both systems load this one checkpoint as the reward
    model and as the critic's start, so they score and value with the same weights.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(
        policy_dir, num_labels=1, pad_token_id=tok.pad_token_id, dtype=torch.float32
    )
    rm.save_pretrained(out)
    tok.save_pretrained(out)


def _pip_config(key: str) -> list[str]:
    out = subprocess.run(["pip", "config", "get", key], capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else []


def peer_python(version: str, package: str = "trl") -> Path:
    """The interpreter of ``package==version``'s own environment, created (once) with torch 2.13.0
    from the local wheel.

    Like ``scripts/setup_env.sh``: uv with pip's ``find-links`` folder (the CPU torch wheel) and
    extra indexes, and PyPI's CUDA builds of torchvision/torchaudio/torchcodec kept out.
    """
    venv = PEER_VENVS / f"{package}-{version}"
    py = venv / "bin" / "python"
    stamp = venv / ".ready"
    module = package.replace("-", "_")
    if (
        stamp.is_file()
        and subprocess.run([py, "-c", f"import {module}, torch"], capture_output=True).returncode == 0
    ):
        return py
    print(f"[peers] installing {package}=={version} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "uv"], check=True)
    excludes = venv / "excludes.txt"
    excludes.write_text("torchvision\ntorchaudio\ntorchcodec\n")
    cmd = [
        str(venv / "bin" / "uv"),
        "pip",
        "install",
        "--python",
        str(py),
        "--index-strategy",
        "unsafe-best-match",
    ]
    for folder in _pip_config("global.find-links") or ["/opt/wheels"]:
        if Path(folder).is_dir():
            cmd += ["--find-links", folder]
    for index in _pip_config("global.extra-index-url"):
        cmd += ["--extra-index-url", index]
    cmd += ["--excludes", str(excludes), "torch==2.13.0", f"{package}=={version}"]
    subprocess.run(cmd, check=True)
    stamp.write_text(version)
    return py


def run_peer(py: Path, script: str, spec: dict, work: Path, timeout_s: float) -> dict:
    """Run ``benchmarks/peers/<script>`` with the peer's interpreter on ``spec``; returns its JSON result.

    The script gets ``SPEC.json OUT.json`` (``spec`` plus ``work_dir``, a fresh folder under
    ``work``) and imports nothing from this repository (``PYTHONPATH`` is dropped).
    """
    name = Path(script).stem
    spec_path, out_path = work / f"{name}_spec.json", work / f"{name}_result.json"
    spec_path.write_text(json.dumps({**spec, "work_dir": str(work / f"{name}_out")}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(py), str(PEER_SCRIPTS / script), str(spec_path), str(out_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(out_path.read_text())
