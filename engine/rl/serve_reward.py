"""Serve a reward model (or any reward function) over HTTP: ``tritonrlhf.engine.rewards.serve``'s server.

    python -m tritonrlhf.engine.rl.serve_reward --reward-model DIR [--tokenizer DIR] \\
        --host 127.0.0.1 --port 8000 [--auth-env REWARD_TOKEN]

The checkpoint is any one-label sequence classifier this project trains (the rm stage) or loads.
It reads the request's texts re-tokenized with its own tokenizer, exactly as the trainer's text
route does (``RewardScorer`` with a ``TextRoute``: the tokenizer's chat template, else the rm
stage's layout; a response cut at ``max_new_tokens`` gets no EOS; a sample longer than the model's
positions scores null). It lives in the RL layer because that scorer does; the protocol and the
server are the core module's.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Sequence

from tritonrlhf.engine.rewards import serve
from tritonrlhf.engine.rl.reward_route import TextRoute
from tritonrlhf.engine.rl.scoring import RewardScorer


def reward_model_fn(
    model_dir: str,
    tokenizer_dir: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    micro_batch_size: int = 8,
) -> Callable[..., list[float | None]]:
    """A reward function ``(prompts, responses, finish_reasons=None) -> [B] float | None`` scoring with an RM.

    Thread-safe (one forward at a time: a threaded server's requests take turns).
    """
    import torch

    from tritonrlhf.engine.models import load_reward_model, load_tokenizer, resolve_dtype

    tok = load_tokenizer(tokenizer_dir or model_dir, role="--tokenizer")
    model = load_reward_model(model_dir, resolve_dtype(dtype, device), "auto", device, role="--reward-model")
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or int(tok.model_max_length)
    scorer = RewardScorer(
        model=model, device=device, micro_batch_size=micro_batch_size, text_route=TextRoute(tok, limit)
    )
    lock = threading.Lock()

    def score(
        prompts: list[str], responses: list[str], finish_reasons: list[str] | None = None
    ) -> list[float | None]:
        with lock, torch.inference_mode():
            values, valid = scorer.score(prompts, responses, finish_reasons=finish_reasons or None)
        return [v if ok else None for v, ok in zip(values.tolist(), valid.tolist())]

    return score


def _load(args: argparse.Namespace) -> Callable[..., list[float | None]]:
    return reward_model_fn(args.reward_model, args.tokenizer, args.device)


def main(argv: Sequence[str] | None = None) -> None:
    serve.main(argv, load_model=_load)


if __name__ == "__main__":
    main()
