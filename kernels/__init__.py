"""Fused Triton kernels for RLHF: log-probs, KL penalties, PPO losses and GAE.

Every function accepts any leading shape and returns float32. CUDA tensors run
Triton kernels; CPU tensors run the PyTorch reference, or the Triton kernels
through the interpreter when ``TRITON_INTERPRET=1``.
"""

if __name__ == "kernels":  # this folder reached by its bare name from a checkout's root: not ours to take
    from tritonrlhf import _yield_bare_name

    _yield_bare_name(__name__, globals())
else:
    from tritonrlhf.kernels.gae import gae, gae_reference
    from tritonrlhf.kernels.kl import kl_penalty, kl_penalty_reference
    from tritonrlhf.kernels.linear_logprobs import linear_logprobs, linear_logprobs_reference
    from tritonrlhf.kernels.logprobs import logprobs_from_logits, logprobs_from_logits_reference
    from tritonrlhf.kernels.ppo_loss import (
        KLLossTerm,
        ppo_policy_loss,
        ppo_policy_loss_reference,
        ppo_value_loss,
        ppo_value_loss_reference,
    )

    __all__ = [
        "KLLossTerm",
        "gae",
        "gae_reference",
        "kl_penalty",
        "kl_penalty_reference",
        "linear_logprobs",
        "linear_logprobs_reference",
        "logprobs_from_logits",
        "logprobs_from_logits_reference",
        "ppo_policy_loss",
        "ppo_policy_loss_reference",
        "ppo_value_loss",
        "ppo_value_loss_reference",
    ]
