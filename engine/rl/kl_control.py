"""The KL coefficient's controllers: fixed, or adaptive toward a target KL (Ziegler et al.), each
owning its ``state_dict`` for checkpoints."""

from __future__ import annotations

import math


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never moves."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, as in TRL).

    ``error = clip(current_kl / target - 1, -0.2, 0.2)``;
    ``coef *= 1 + error * n_steps / horizon``. ``n_steps`` is the number of
    samples (or steps, consistently) since the last update.
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))


def make_kl_controller(coef: float, adaptive: bool, target: float, horizon: int):
    """``KLConfig`` fields -> FixedKLController or AdaptiveKLController."""
    return AdaptiveKLController(coef, target, horizon) if adaptive else FixedKLController(coef)
