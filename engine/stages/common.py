"""What the offline stages (SFT, RM, DPO) share: setup, checkpoints and resume, the loop's logging
and summary, tokenizing, eval splits.

The DeepSpeed engine itself is ``tritonrlhf.engine.rl.train_engine.TrainEngine`` (AdamW, clipping,
warmup, ZeRO stage from ``OptimConfig``, the non-finite step guard), reused as is.

Sequences follow the layout of every stage: ``<bos> prompt response <eos>``,
prompt tokenized without special tokens (as ``tritonrlhf.engine.data.PromptDataset`` does,
so a PPO prompt is exactly an SFT prompt), right-padded for training.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tritonrlhf.engine import distributed as D
from tritonrlhf.engine.checkpoint import writable_dir
from tritonrlhf.engine.config import (
    ConfigError,
    check_choice,
    check_dtype,
    check_optim,
    check_positive,
    check_stage_counts,
    save_config,
)
from tritonrlhf.engine.data import (  # noqa: F401 (encode_* and nonblank_line_numbers are re-exported)
    DataError,
    encode_prompt,
    encode_response,
    nonblank_line_numbers,
    render_chat,
)

if TYPE_CHECKING:
    from tritonrlhf.engine.checkpoint import GracefulShutdown
    from tritonrlhf.engine.data import PromptSampler
    from tritonrlhf.engine.metrics import MetricsLogger
    from tritonrlhf.engine.rl.train_engine import TrainEngine


# --------------------------------------------------------------------------- setup
def run_on_main(cfg: Any, work: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Init distributed (if launched), validate, then ``work(cfg)`` on rank 0 while the others wait.

    For the stages whose work is one process's (eval, red teaming, labelling, revision); the
    other ranks of a ``deepspeed`` launch return ``{}``.
    """
    D.init_distributed()
    cfg.validate(D.world_size())
    result = work(cfg) if D.is_main() else {}
    D.barrier()
    return result


def setup_stage(cfg: Any, name: str = "train") -> MetricsLogger:
    """Init distributed (if launched), validate, seed, write the resolved config; return the logger.

    Call first in every stage. Starts a fresh ``metrics.jsonl``. Rank 0 writes; other ranks
    get a disabled logger.
    """
    _init_stage(cfg)
    return _open_output(cfg, name, resume_step=0)


def setup_resumable_stage(cfg: Any, name: str) -> tuple[MetricsLogger, StageCheckpoints]:
    """``setup_stage`` for a stage with full-state checkpoints (SFT, RM, DPO).

    Resolves ``cfg.resume`` before any work, so a bad path fails at once; a resumed run keeps
    the ``metrics.jsonl`` rows up to its checkpoint's step. The checkpoint itself is loaded
    by ``StageCheckpoints.attach`` once the engine exists.
    """
    _init_stage(cfg)
    ckpt = StageCheckpoints(cfg, name)
    return _open_output(cfg, name, ckpt.resume_step), ckpt


def _init_stage(cfg: Any) -> None:
    D.init_distributed()
    cfg.validate(D.world_size())
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank


def _open_output(cfg: Any, name: str, resume_step: int) -> MetricsLogger:
    from tritonrlhf.engine.metrics import MetricsLogger, drop_rows_after

    out = writable_dir(cfg.output_dir)  # every rank: each raises the same error, none waits at a barrier
    if D.is_main():
        log = out / "metrics.jsonl"
        if resume_step:
            drop_rows_after(log, resume_step)  # the killed run may have logged steps past its checkpoint
        else:
            log.unlink(missing_ok=True)  # a fresh log
        save_config(cfg, out)
    D.barrier()
    return MetricsLogger(out, cfg.logging, cfg.total_steps, resume_step, enabled=D.is_main(), desc=name)


def validate_stage(cfg: Any, world_size: int) -> None:
    """Checks shared by the SFT, RM and DPO stages (``cfg`` has model/data/train/optim sections).

    All three resume from full-state checkpoints: ``resume=auto|never|<checkpoint path>``.
    """
    check_choice("resume", cfg.resume, ("auto", "never"), allow_path=True)
    check_positive("total_steps", cfg.total_steps)
    check_stage_counts(cfg)
    check_optim("optim", cfg.optim)
    check_dtype(cfg.model.dtype)
    t = cfg.train
    check_positive("train.batch_size", t.batch_size)
    check_positive("train.micro_batch_size", t.micro_batch_size)
    if t.batch_size % (t.micro_batch_size * world_size):
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by "
            f"micro_batch_size x world_size = {t.micro_batch_size} x {world_size}"
        )
    if cfg.data.eval_size < 0:
        raise ConfigError(f"data.eval_size must be >= 0, got {cfg.data.eval_size}")
    for key, path in (("model.path", cfg.model.path), ("model.tokenizer", cfg.model.tokenizer)):
        if path and not Path(path).exists():
            raise ConfigError(f"{key}: path does not exist: {path}")
    if not cfg.model.path:
        cfg.model.tiny.validate()


# --------------------------------------------------------------------------- checkpoints
@dataclass
class LoopState:
    """What a stage's step loop carries from one step to the next; saved in every checkpoint.

    step:   optimizer steps done
    window: sums since the last logged row (the stage names the keys; zeroed by ``logged``)
    first, last: the first and the latest logged rows, for the summary
    """

    window: dict[str, float]
    step: int = 0
    first: dict[str, Any] | None = None
    last: dict[str, Any] | None = None

    def logged(self, row: dict[str, Any]) -> None:
        """Record that ``row`` was logged and start a new window."""
        self.first = self.first or row
        self.last = row
        self.window = dict.fromkeys(self.window, 0.0)


class StageCheckpoints:
    """Full-state checkpoints of an offline stage (SFT, RM, DPO): resume, periodic saves, SIGTERM, skip limit.

    Each checkpoint (``tritonrlhf.engine.checkpoint`` layout, role ``name``) holds the DeepSpeed engine
    (weights, optimizer, LR schedule), every RNG, the sampler's position (epoch and index;
    the shuffle order is a function of the seed and the epoch), the engine's update and skip
    counters, the ``LoopState``, the resolved config, and an HF export in ``hf/``. A run
    resumed from it repeats the uninterrupted run's steps exactly.
    """

    def __init__(self, cfg: Any, name: str) -> None:
        from tritonrlhf.engine.checkpoint import CheckpointManager, step_of

        self.cfg, self.role = cfg, name
        self.manager = CheckpointManager(cfg.output_dir, cfg.keep_last, D.rank(), D.world_size())
        self.resume_from = self.manager.resolve(cfg.resume)
        self.resume_step = step_of(self.resume_from) if self.resume_from is not None else 0

    def attach(
        self, train: TrainEngine, sampler: PromptSampler, export_hf: Callable[[Path], None], loop: LoopState
    ) -> LoopState:
        """Give the run's parts; when resuming, load the checkpoint into them (a collective).

        Returns the loop state to continue from (``loop`` itself on a fresh start). A checkpoint
        of another model shape, world size or data size is a ``ConfigError``.
        """
        self.train, self.sampler, self.export_hf = train, sampler, export_hf
        if self.resume_from is None:
            return loop
        state = self.manager.load(self.resume_from, {self.role: train.engine})
        try:
            sampler.load_state_dict(state["sampler"])
        except ValueError as e:
            raise ConfigError(f"resume: {self.resume_from}: {e}") from None
        train.load_counters(state["counters"])
        loop = LoopState(**state["loop"])
        if D.is_main():
            print(f"[{self.role}] resumed from {self.resume_from} at step {loop.step}", flush=True)
        return loop

    def save(self, loop: LoopState) -> Path:
        """Checkpoint step ``loop.step`` (a collective); returns its folder."""
        from tritonrlhf.engine.config import to_dict

        state = {
            "loop": dataclasses.asdict(loop),
            "sampler": self.sampler.state_dict(),
            "counters": self.train.counters(),
        }
        path = self.manager.save(
            loop.step, {self.role: self.train.engine}, state, self.export_hf, config=to_dict(self.cfg)
        )
        if D.is_main():
            secs = self.manager.last_save_seconds.get("total", 0.0)
            print(f"[{self.role}] saved checkpoint {path} ({secs:.1f}s)", flush=True)
        return path

    def end_step(self, loop: LoopState, stop: GracefulShutdown) -> dict[str, Any] | None:
        """Call after every step, on every rank (a collective).

        Saves when ``save_every`` says so. After a SIGTERM/SIGINT, saves and returns the stage's
        result ``{"stopped": True, "step", "checkpoint"}``: the caller returns it. After
        ``max_consecutive_skips`` skipped updates in a row, saves and raises ``NonFiniteError``
        naming the step.
        """
        from tritonrlhf.engine.rl.train_engine import stop_on_consecutive_skips

        cfg, step = self.cfg, loop.step
        signalled = stop.should_stop_all() and step < cfg.total_steps
        saved = None
        if signalled or (cfg.save_every and step % cfg.save_every == 0):
            saved = self.save(loop)
        limit = cfg.max_consecutive_skips
        stop_on_consecutive_skips(self.train.consecutive_skips, limit, step, lambda: saved or self.save(loop))
        if not signalled:
            return None
        if D.is_main():
            print(stop.stop_message(step, saved), flush=True)
        return {"stopped": True, "step": step, "checkpoint": str(saved)}


# --------------------------------------------------------------------------- the loop's rows and summary
def log_due(cfg: Any, step: int) -> bool:
    """Whether ``step`` logs a row: every ``train.log_every`` steps, the first and the last."""
    return step % cfg.train.log_every == 0 or step in (1, cfg.total_steps)


def eval_due(cfg: Any, step: int) -> bool:
    """Whether a logged ``step`` also evaluates: every ``train.eval_every`` steps (0: never) and the last."""
    return bool(cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.total_steps


def finish_stage(
    logger: MetricsLogger,
    loop: LoopState,
    train: TrainEngine,
    final: Path,
    t_start: float,
    head: dict[str, Any],
) -> dict[str, Any]:
    """Write ``summary.json``; returns the summary.

    The summary is ``head`` (the stage's first/last training metrics, its data counts), the
    last logged row's ``eval/*`` metrics, the skipped updates, the final HF checkpoint
    ``final``, the world size and the wall time since ``t_start``.
    """
    summary = {
        **head,
        **{k: v for k, v in (loop.last or {}).items() if k.startswith("eval/")},
        "skipped_steps": train.skipped,
        "checkpoint": str(final),
        "world_size": D.world_size(),
        "wall_s": time.time() - t_start,
    }
    logger.write_summary(summary)
    return summary


# --------------------------------------------------------------------------- tokenizing
@dataclass
class EncodeStats:
    """Counts of what tokenizing changed; reported in metrics as ``data/*``."""

    prompts_truncated: int = 0
    prompts_dropped: int = 0
    responses_truncated: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "data/") -> dict[str, int]:
        return {
            f"{prefix}prompts_truncated": self.prompts_truncated,
            f"{prefix}prompts_dropped": self.prompts_dropped,
            f"{prefix}responses_truncated": self.responses_truncated,
            **{f"{prefix}{k}": v for k, v in self.extra.items()},
        }


def fit_prompt(
    ids: list[int], max_prompt_len: int, on_long: str, bos: int | None, stats: EncodeStats
) -> list[int] | None:
    """Apply ``max_prompt_len``: keep <bos> + the last tokens (truncate) or None (drop); counted."""
    if len(ids) <= max_prompt_len:
        return ids
    if on_long == "drop":
        stats.prompts_dropped += 1
        return None
    stats.prompts_truncated += 1
    if bos is not None and ids[:1] == [bos]:
        return [bos] + ids[len(ids) - max_prompt_len + 1 :]
    return ids[-max_prompt_len:]


def fit_response(prompt: list[int], response: list[int], max_len: int, stats: EncodeStats) -> list[int]:
    """Cut ``response`` so prompt + response fits ``max_len`` tokens; counted."""
    room = max_len - len(prompt)
    if len(response) > room:
        stats.responses_truncated += 1
        return response[:room]
    return response


def pad_right(rows: Sequence[Sequence[int]], pad: int, length: int | None = None) -> torch.Tensor:
    """[B, T] long tensor, each row followed by ``pad`` up to ``length`` (default: the longest row)."""
    T = length or max(len(r) for r in rows)
    out = torch.full((len(rows), T), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


@dataclass
class TokenizedPair:
    """One preference record, tokenized: ``prompt`` starts with <bos>, ``chosen``/``rejected`` end with <eos>.

    ``record`` is the JSON object it came from and ``where`` its ``file:line``, for later checks.
    """

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    record: dict[str, Any]
    where: str


def tokenize_preference_pairs(
    path: str | os.PathLike,
    tokenizer: Any,
    max_len: int,
    max_prompt_len: int,
    on_long_prompt: str = "truncate",
) -> tuple[list[TokenizedPair], EncodeStats, int]:
    """Read, check and tokenize preference JSONL (errors name file:line and the column).

    The one loader of preference data (RM, DPO, eval). A record is plain ``{"prompt", "chosen",
    "rejected"}`` strings, or TRL's conversational form (``preference_texts``): chat messages
    rendered by the tokenizer's chat template. Pairs whose responses are equal as text are dropped
    and counted in ``stats.extra["pairs_identical_dropped"]``, those equal only after truncation in
    ``["pairs_identical_after_truncation_dropped"]``; over-long prompts follow ``on_long_prompt``.
    Returns (pairs, stats, number of records read).
    """
    from tritonrlhf.engine.data import read_jsonl

    records = read_jsonl(path, [], text=[])
    lines = nonblank_line_numbers(path)
    stats = EncodeStats(extra={"pairs_identical_dropped": 0, "pairs_identical_after_truncation_dropped": 0})
    bos = tokenizer.bos_token_id
    pairs = []
    for rec, line in zip(records, lines):
        where = f"{path}:{line}"
        prompt_text, chosen_text, rejected_text, chat = preference_texts(rec, tokenizer, where)
        if chosen_text.strip() == rejected_text.strip():
            stats.extra["pairs_identical_dropped"] += 1
            continue
        prompt = fit_prompt(encode_prompt(tokenizer, prompt_text), max_prompt_len, on_long_prompt, bos, stats)
        if prompt is None:
            continue
        # A chat response is the assistant turn as the template renders it (its own end-of-turn
        # tokens included); a plain one gets <eos>.
        encode = _encode_rendered if chat else encode_response
        chosen = fit_response(prompt, encode(tokenizer, chosen_text), max_len, stats)
        rejected = fit_response(prompt, encode(tokenizer, rejected_text), max_len, stats)
        if chosen == rejected:
            stats.extra["pairs_identical_after_truncation_dropped"] += 1
            continue
        pairs.append(TokenizedPair(prompt, chosen, rejected, rec, where))
    return pairs, stats, len(records)


def _encode_rendered(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def preference_texts(rec: dict[str, Any], tokenizer: Any, where: str) -> tuple[str, str, str, bool]:
    """``(prompt, chosen, rejected, chat)`` texts of one preference record, checked.

    Accepted forms (TRL's names):

    * standard: ``prompt``, ``chosen``, ``rejected`` non-empty strings;
    * conversational: ``prompt`` a list of messages ending with a user (or system) turn,
      ``chosen`` / ``rejected`` lists of assistant messages;
    * conversational, implicit prompt: no ``prompt``; ``chosen`` / ``rejected`` whole
      conversations whose shared leading messages are the prompt, the rest assistant turns.

    Chat prompts are rendered with the generation prompt; a chat response is the text the template
    adds for it after that (``chat`` is True then).
    """
    from tritonrlhf.engine.data import check_messages

    for col in ("chosen", "rejected"):
        if col not in rec:
            raise DataError(f"{where}: missing column {col!r} (has {sorted(rec)})")
    if "prompt" in rec and all(isinstance(rec[c], str) for c in ("prompt", "chosen", "rejected")):
        for col in ("prompt", "chosen", "rejected"):
            if not rec[col].strip():
                raise DataError(f"{where}: column {col!r} is empty")
        return rec["prompt"], rec["chosen"], rec["rejected"], False
    if "prompt" not in rec and not isinstance(rec["chosen"], list):
        raise DataError(f"{where}: missing column 'prompt' (has {sorted(rec)})")
    kinds = {c: type(rec[c]).__name__ for c in ("prompt", "chosen", "rejected") if c in rec}
    if any(k != "list" for k in kinds.values()):
        raise DataError(
            f"{where}: columns {kinds} mix forms: give 'prompt', 'chosen' and 'rejected' as strings, "
            "or all as lists of chat messages ('prompt' may be left out when 'chosen' and 'rejected' "
            "are whole conversations)"
        )
    for col in ("chosen", "rejected"):
        check_messages(rec[col], where, col, last="assistant")
    if "prompt" in rec:
        prompt, chosen, rejected = rec["prompt"], rec["chosen"], rec["rejected"]
    else:  # implicit prompt: the messages both conversations share
        n = 0
        while n < min(len(rec["chosen"]), len(rec["rejected"])) and rec["chosen"][n] == rec["rejected"][n]:
            n += 1
        while n and rec["chosen"][n - 1]["role"] == "assistant":  # a shared assistant turn ends no prompt
            n -= 1
        if n == 0:
            raise DataError(
                f"{where}: no 'prompt' column, and 'chosen' and 'rejected' share no leading user turn "
                "to take as the prompt (implicit-prompt form)"
            )
        prompt, chosen, rejected = rec["chosen"][:n], rec["chosen"][n:], rec["rejected"][n:]
    check_messages(prompt, where, "prompt", last="prompt")
    for col, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or any(m["role"] != "assistant" for m in turns):
            raise DataError(
                f"{where}: column {col!r}: the response after the prompt must be assistant turns only, "
                f"got roles {[m['role'] for m in turns]}"
            )
    prompt_text = render_chat(tokenizer, prompt, where, "prompt")
    responses = []
    for col, turns in (("chosen", chosen), ("rejected", rejected)):
        full = render_chat(tokenizer, prompt + turns, where, col, generation_prompt=False)
        if not full.startswith(prompt_text) or len(full) == len(prompt_text):
            raise DataError(
                f"{where}: column {col!r}: the chat template does not render the prompt (with its "
                "generation prompt) as the start of the whole conversation, so the response cannot "
                "be cut out of it"
            )
        responses.append(full[len(prompt_text) :])
    return prompt_text, responses[0], responses[1], True


def split_eval(n: int, eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): a seeded random ``eval_size`` held out; at least one left to train."""
    if eval_size >= n:
        raise DataError(f"data.eval_size={eval_size} leaves no training data ({n} usable records)")
    order = list(range(n))
    random.Random(f"eval-split-{seed}").shuffle(order)
    return sorted(order[eval_size:]), sorted(order[:eval_size])
