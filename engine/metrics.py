"""Per-step metrics: ``metrics.jsonl``, tensorboard, wandb (optional) and a tqdm bar; the RL
loop's decoded samples: ``samples.jsonl`` (``MetricsLogger.log_samples``).

Only the logging rank (rank 0) writes; the others get a no-op logger so the
trainer loop can call it unconditionally.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tritonrlhf.engine.config import LoggingConfig


class MetricsLogger:
    """Appends one JSON object per step to ``<output_dir>/metrics.jsonl`` and mirrors it.

    tensorboard and wandb are imported lazily, only when enabled, so neither is a
    hard dependency.
    """

    def __init__(
        self,
        output_dir: str | Path,
        cfg: LoggingConfig,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        run_config: dict[str, Any] | None = None,
        desc: str = "ppo",
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = self._wandb = self._bar = None
        self.history: list[dict[str, Any]] = []
        self._start = time.time()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except ImportError:  # tensorboard not installed: jsonl still has everything
                self._tb = None
        if cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("logging.wandb=true but wandb is not installed (pip install wandb)") from e
            self._wandb = wandb.init(project=cfg.wandb_project, dir=str(output_dir), config=run_config)
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` for ``step``; non-finite floats are written as null in JSON."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        if self._bar is not None:
            self._bar.update(1)
            shown = {k: row[k] for k in ("reward/mean", "kl/mean", "loss/policy") if row.get(k) is not None}
            self._bar.set_postfix({k.split("/")[0]: f"{v:.3f}" for k, v in shown.items()})

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` (one dict per sample, ``step`` added) to ``<output_dir>/samples.jsonl``,
        and show them as a table in tensorboard (``samples`` text) and wandb (``samples`` table)."""
        if not self.enabled or not rows:
            return
        rows = [{"step": step, **{k: _plain(v) for k, v in r.items()}} for r in rows]
        with (self.path.parent / "samples.jsonl").open("a") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)
        cols = list(rows[0])
        if self._tb is not None:
            self._tb.add_text("samples", _markdown_table(cols, rows), step)
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
            self._wandb.log({"samples": table}, step=step)

    def write_summary(self, extra: dict[str, Any] | None = None) -> Path | None:
        """Write ``summary.json``: the last step's metrics, first/last reward and wall time."""
        if not self.enabled:
            return None
        summary: dict[str, Any] = {"steps": len(self.history), "wall_s": time.time() - self._start}
        if self.history:
            summary["first"] = self.history[0]
            summary["last"] = self.history[-1]
        summary.update(extra or {})
        path = self.path.parent / "summary.json"
        path.write_text(json.dumps(summary, indent=2, allow_nan=False))
        return path

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def drop_rows_after(path: str | os.PathLike, step: int) -> None:
    """Rewrite a ``metrics.jsonl`` (or ``samples.jsonl``) keeping the rows with ``step <= step`` (and
    dropping a torn last line).

    A resumed run calls it: the killed run may have logged steps past its last checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        return
    lines = p.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if line.strip() and json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
        except ValueError:
            pass
    if len(kept) != len(lines):
        tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, p)


def _markdown_table(cols: list[str], rows: list[dict[str, Any]]) -> str:
    """Rows as a markdown table (tensorboard renders its text plugin's markdown); cells escaped."""

    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _plain(v: Any) -> Any:
    """Tensors and numpy scalars to Python numbers; NaN/inf to None (valid JSON)."""
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class PhaseTimes(dict):
    """Seconds per named phase, summed over repeats: ``with times("time/score/ref_s"): ...``.

    A dict, so a step's metrics take it as it is (``time/`` keys reduce with the max over ranks).
    """

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[key] = self.get(key, 0.0) + time.perf_counter() - t0
