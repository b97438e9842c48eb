"""Tiny judges trained in a few seconds to a known behaviour, for the label and revise tests."""

from __future__ import annotations

from collections.abc import Callable

import torch


def fit_continuations(
    model: torch.nn.Module,
    tokenizer,
    example: Callable[[], tuple[str, list[int]]],
    steps: int = 120,
    batch: int = 16,
    lr: float = 3e-3,
    stop_loss: float = 0.01,
) -> float:
    """Teach ``model`` to continue each ``example()`` text (encoded with <bos>) with its target ids.

    Cross-entropy on the target tokens only, left-padded batches, Adam; stops early once the loss is
    below ``stop_loss``. Returns the last loss; the model is left in eval mode.
    """
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = torch.tensor(float("inf"))
    for _ in range(steps):
        rows = []
        for _ in range(batch):
            text, target = example()
            rows.append((tokenizer(text)["input_ids"], list(target)))
        T = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((batch, T), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, T), -100, dtype=torch.long)
        am = torch.zeros((batch, T), dtype=torch.long)
        for i, (p, t) in enumerate(rows):
            seq = p + t
            ids[i, T - len(seq) :] = torch.tensor(seq)
            am[i, T - len(seq) :] = 1
            labels[i, T - len(t) :] = torch.tensor(t)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < stop_loss:
            break
    model.eval()
    return loss.item()
