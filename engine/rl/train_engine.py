"""The DeepSpeed engine every trained role runs on (actor, critic, the offline stages): AdamW with the
non-finite guard, clipping, the lr schedule, accumulation over variable micro-batch counts, and the
consecutive-skip stop."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tritonrlhf.engine import distributed as D
from tritonrlhf.engine.config import OptimConfig


# --------------------------------------------------------------------------- DeepSpeed engine
class _FiniteGuardAdamW(torch.optim.AdamW):
    """AdamW that skips its update on every rank when any rank's gradients are non-finite.

    DeepSpeed checks overflow only for fp16 (ZeRO-3) or by config, so the guard
    sits in the one place every ZeRO stage calls: the base optimizer's ``step``
    (on the rank's fp32 partition). ``force_skip`` marks a step whose loss was
    non-finite. The decision is sticky until ``reset()`` (ZeRO-3 may call
    ``step`` once per sub-group).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.force_skip = False
        self.skip_decision: bool | None = None

    def reset(self) -> None:
        self.force_skip = False
        self.skip_decision = None

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        if self.skip_decision is None or not self.skip_decision:
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            # A non-finite entry shows in its tensor's max or min (NaN propagates through both):
            # two reductions per tensor, no bool copy of every gradient.
            extremes = [g.amax() for g in grads if g.numel()] + [g.amin() for g in grads if g.numel()]
            bad = self.force_skip or (bool(extremes) and not bool(torch.stack(extremes).isfinite().all()))
            self.skip_decision = D.all_reduce_max(float(bad)) > 0
        if self.skip_decision:
            return None
        return super().step(closure)


def deepspeed_config(
    optim: OptimConfig,
    micro_batch_size: int,
    grad_accum: int,
    dtype: torch.dtype,
    total_updates: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict for one trained model.

    ``total_updates`` (optimizer steps in the whole run) is needed by ``optim.lr_schedule=cosine``.
    """
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(optim.grad_clip),
        "zero_optimization": {"stage": int(optim.zero_stage)},
        # 16-bit module weights and gradients; DeepSpeed keeps fp32 master weights and Adam state.
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if optim.zero_stage == 3:
        cfg["zero_optimization"].update(
            {"stage3_param_persistence_threshold": 0, "sub_group_size": int(1e12)}
        )
    if optim.lr_schedule == "cosine":
        if not total_updates or total_updates <= 0:
            raise ValueError("optim.lr_schedule=cosine needs the run's total number of updates")
        cfg["scheduler"] = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": int(total_updates),
                "warmup_min_ratio": 0.0,
                "warmup_num_steps": max(int(optim.warmup_steps), 1),
                "cos_min_ratio": float(optim.min_lr_ratio),
                "warmup_type": "linear",
            },
        }
    elif optim.lr_schedule != "constant":
        raise ValueError(f"optim.lr_schedule must be constant or cosine, got {optim.lr_schedule!r}")
    elif optim.warmup_steps > 0:
        cfg["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": float(optim.lr),
                "warmup_num_steps": int(optim.warmup_steps),
                "warmup_type": "linear",
            },
        }
    return cfg


# Where DeepSpeed's optimizer wrappers keep the fp32 master weights: ZeRO-0 in 16 bits
# (FP16_UnfusedOptimizer), ZeRO-1/2, ZeRO-3. Without a wrapper the module's own parameters are updated.
_MASTER_ATTRS = ("fp32_groups", "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def default_dtype() -> torch.dtype:
    """bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


class TrainEngine:
    """A DeepSpeed engine around ``module`` with AdamW, clipping, the lr schedule and the non-finite guard.

    ``micro_step(loss, finite)`` runs backward + engine step per micro-batch; ``finish()`` ends the
    mini-batch and reports whether it was skipped. ``begin(n)`` before a mini-batch of ``n``
    micro-batches, where ``n`` varies (token-budget micro-batches), takes the accumulation over
    from DeepSpeed's fixed ``gradient_accumulation_steps`` (call it for every mini-batch then).
    Used by the actor and critic and every offline stage. ``total_updates``: optimizer steps in
    the whole run (for ``optim.lr_schedule=cosine``).
    """

    def __init__(
        self,
        module: nn.Module,
        optim: OptimConfig,
        micro_batch_size: int,
        grad_accum: int,
        dtype: torch.dtype | None = None,
        total_updates: int | None = None,
    ) -> None:
        import deepspeed

        D.ensure_single_process_env()
        self.dtype = dtype or default_dtype()
        self.grad_accum = grad_accum
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = _FiniteGuardAdamW(
            params,
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            # torch's fused AdamW (one kernel over all tensors; on CPU too): the same update as the
            # per-tensor loop within fp32 rounding, 2x faster on CPU. Other devices keep the loop.
            fused=bool(params) and all(p.device.type in ("cpu", "cuda") for p in params),
        )
        cfg = deepspeed_config(optim, micro_batch_size, grad_accum, self.dtype, total_updates)
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=self.optimizer, config=cfg)
        if type(self.engine.optimizer).__name__ == "FP16_UnfusedOptimizer":
            # ZeRO-0 in bf16/fp16: DeepSpeed creates Adam's state with one step on zero gradients,
            # which then counts in the bias correction (the first real update came out at 0.73x the
            # lr of ZeRO-1/2/3). Drop that state; AdamW rebuilds it on the first real step.
            self.optimizer.state.clear()
        if self.engine.dp_world_size == 1 and self.engine.zero_optimization_stage() == 0:
            # One data-parallel rank at ZeRO-0 has nothing to average, yet DeepSpeed's backward
            # still flattens every gradient into a bucket, "all-reduces" it alone and copies it
            # back: two passes over the gradients, ~13 ms per update of 3.2M parameters on one CPU
            # thread. The gradients are the same without it (tested).
            self.engine.enable_backward_allreduce = False
        self.device = self.engine.device
        self.steps = 0
        self.skipped = 0
        self.consecutive_skips = 0  # skipped updates since the last applied one
        self._z0_norm = float("nan")
        self._n_micro: int | None = None  # set by begin(): this mini-batch's micro-batch count
        self._micro_done = 0

    def precision(self) -> dict[str, list[str]]:
        """The dtypes this rank holds: ``params`` (the module's), ``master`` (the weights the
        optimizer updates: DeepSpeed's fp32 copies in bf16/fp16 mode) and ``optim_state`` (Adam's
        moments). bf16 mode gives ``bfloat16`` / ``float32`` / ``float32``."""
        o = self.engine.optimizer
        master = next(
            (getattr(o, a) for a in _MASTER_ATTRS if getattr(o, a, None) is not None),
            [g["params"] for g in self.optimizer.param_groups],
        )
        flat = [t for x in master for t in (x if isinstance(x, (list, tuple)) else [x])]
        state = [
            v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()
        ]

        def names(ts) -> list[str]:
            return sorted({str(t.dtype).removeprefix("torch.") for t in ts})

        return {
            "params": names(self.engine.module.parameters()),
            "master": names(flat),
            "optim_state": names(state),
        }

    def begin(self, n_micro: int) -> None:
        """Start a mini-batch of ``n_micro`` micro-batches: each ``micro_step`` then divides its loss
        by ``n_micro`` (as DeepSpeed divides by gradient_accumulation_steps) and the last one is
        the accumulation boundary (``set_gradient_accumulation_boundary``), whatever the config's count."""
        if n_micro < 1:
            raise ValueError(f"a mini-batch needs at least one micro-batch, got {n_micro}")
        self._n_micro, self._micro_done = n_micro, 0

    def micro_step(self, loss: torch.Tensor, finite: bool) -> None:
        """Backward one micro-batch (scaled by 1/grad_accum, or 1/n of ``begin(n)``); a non-finite
        loss forces a skip."""
        if not finite:
            self.optimizer.force_skip = True
        if self._n_micro is None:
            self.engine.backward(loss)
        else:
            self._micro_done += 1
            self.engine.set_gradient_accumulation_boundary(self._micro_done == self._n_micro)
            self.engine.backward(loss / self._n_micro, scale_wrt_gas=False)
        if self.engine.is_gradient_accumulation_boundary() and self.engine.zero_optimization_stage() == 0:
            # ZeRO-0 keeps full gradients and DeepSpeed does not report their norm; take it pre-clip.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._z0_norm = (
                float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
            )
        self.engine.step()

    def finish(self) -> dict[str, float]:
        """Called after the last ``micro_step``: read the step's outcome and reset the guard."""
        ds_skipped = getattr(self.engine.optimizer, "overflow", False)
        skipped = bool(self.optimizer.skip_decision) or bool(ds_skipped)
        self.optimizer.reset()
        self.steps += 1
        self.skipped += int(skipped)
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else self._z0_norm
        lr = (
            self.engine.get_lr()[0]
            if self.engine.lr_scheduler is not None
            else self.optimizer.param_groups[0]["lr"]
        )
        return {
            "grad_norm": norm if not skipped else float("nan"),
            "lr": float(lr),
            "skipped": float(skipped),
        }

    def counters(self) -> dict[str, int]:
        """The update counters a checkpoint carries (the engine's own state is DeepSpeed's)."""
        return {"steps": self.steps, "skipped": self.skipped, "consecutive_skips": self.consecutive_skips}

    def load_counters(self, counters: Mapping[str, int]) -> None:
        self.steps = int(counters["steps"])
        self.skipped = int(counters["skipped"])
        self.consecutive_skips = int(counters["consecutive_skips"])


class NonFiniteError(RuntimeError):
    """Too many updates in a row were skipped for a non-finite loss or gradient."""


def stop_on_consecutive_skips(
    consecutive: int, limit: int, step: int, save: Callable[[], Any] | None = None
) -> None:
    """Raise ``NonFiniteError`` naming ``step`` once ``consecutive`` skipped updates reach ``limit``.

    ``limit`` 0 never stops. ``save`` (a checkpoint; collective, so every rank must call this
    with the same counts, which the guard's agreed skip decision gives) runs first and the
    message names what it returns, so the run can be resumed once the cause is fixed.
    """
    if not limit or consecutive < limit:
        return
    saved = f"; checkpoint saved to {save()}" if save is not None else ""
    raise NonFiniteError(
        f"step {step}: {consecutive} updates in a row were skipped for a non-finite loss or gradient "
        f"(max_consecutive_skips={limit}){saved}. Lower the learning rate or fix the data, then resume."
    )
