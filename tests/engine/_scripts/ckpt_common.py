"""A tiny DeepSpeed-trained Llama shared by the checkpoint tests, scripts and benchmark.

``build_engine`` wraps ``build_tiny_model`` in a DeepSpeed engine (AdamW + WarmupLR, so
the optimizer moments and the LR schedule both matter); ``train_step`` draws its batch
from the global torch RNG, so a resumed run only repeats an uninterrupted one if the
RNG streams were restored too.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

from tritonrlhf.engine import distributed as D
from tritonrlhf.engine.config import TinyModelConfig
from tritonrlhf.engine.models import build_tiny_model, build_tokenizer

BATCH, SEQ = 2, 12


def ds_config(zero_stage: int, warmup_steps: int = 10) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": 1e-2,
                "warmup_num_steps": warmup_steps,
                "warmup_type": "linear",
            },
        },
    }
    if zero_stage == 3:
        cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0})
    return cfg


def build_engine(zero_stage: int = 2, tiny: TinyModelConfig | None = None, seed: int = 0):
    """(DeepSpeed engine around a tiny LlamaForCausalLM, tokenizer); same seed, same weights."""
    import deepspeed

    D.init_distributed()
    D.ensure_single_process_env()
    tok = build_tokenizer()
    model = build_tiny_model(tok, tiny or TinyModelConfig(), seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(zero_stage))
    return engine, tok


def train_step(engine, vocab: int = 64) -> float:
    """One optimizer step on a batch drawn from the global torch RNG; returns the loss."""
    x = torch.randint(4, vocab, (BATCH, SEQ)).to(engine.device)
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def param_digest(module: torch.nn.Module) -> str:
    """sha256 of the full (gathered under ZeRO-3) parameters' bytes, in name order."""
    h = hashlib.sha256()
    params = list(module.named_parameters())
    ctx = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    with ctx:
        for name, p in params:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TorchEngine:
    """The two DeepSpeed-engine methods ``CheckpointManager`` calls, for a plain module + optimizer.

    Lets the subprocess tests exercise the save/kill/resume flow in seconds, without
    importing DeepSpeed; the DeepSpeed engine itself is tested in-process and in the slow tests.
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = True) -> None:
        import os

        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        torch.save(state, os.path.join(save_dir, tag, "state.pt"))

    def load_checkpoint(self, load_dir: str, tag: str, **kw) -> tuple[str, dict]:
        import os

        path = os.path.join(load_dir, tag, "state.pt")
        state = torch.load(path, weights_only=True)
        self.module.load_state_dict(state["module"])
        if kw.get("load_optimizer_states", True):
            self.optimizer.load_state_dict(state["optimizer"])
        return path, {}


def build_torch_engine(seed: int = 0) -> TorchEngine:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    return TorchEngine(module, torch.optim.AdamW(module.parameters(), lr=1e-2))


def torch_train_step(engine: TorchEngine) -> float:
    """One AdamW step on a batch from the global torch RNG."""
    x = torch.randn(8, 16)
    loss = (engine.module(x) - x.sum(-1, keepdim=True)).pow(2).mean()
    engine.optimizer.zero_grad()
    loss.backward()
    engine.optimizer.step()
    return float(loss.detach())
