"""Packed sequences and token-budget micro-batches for the training-side passes.

A packed micro-batch is its samples' real tokens (``attention_mask`` 1) concatenated into rows with
``position_ids`` restarting at 0 for each sample; with ``attention_mask=None``, ``use_cache=False``
and restarting positions, transformers' masking utilities (``find_packed_sequence_indices``;
flash-attention's varlen path for ``flash_attention_2``) build a block-diagonal causal mask, so
every token sees exactly what it sees in the padded ``[B, T]`` forward with
``position_ids_from_mask``. ``Packed.slot`` maps each padded position to its place in the rows, so
per-token outputs go back into the padded layout the rest of the code expects (``unflatten``),
zeros where the padded forward computed padding.

The rows: with flash-attention, one row ``[1, N]`` (its varlen kernel attends within each sample).
With eager/sdpa attention the mask is dense over a row, so a row of N tokens costs N^2 in
attention: there the samples are placed first-fit decreasing into rows as long as the longest
sample (``[R, T]``, R <= B), each row's unused tail a block of its own. The matmuls then run on
about the real tokens and attention costs no more than the padded batch's (``row_capacity``).

Token-budget micro-batches (``ppo.micro_batch_tokens``) group consecutive samples of a mini-batch
greedily under a budget of real tokens; a longer sample goes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tritonrlhf.engine.rl.experience import Experience

# model_type -> verified (tests/engine/rl/test_packing.py): the decoder builds its mask with
# transformers' create_causal_mask / create_sliding_window_causal_mask from the position_ids it is
# given, and takes rotary positions from them. Others are refused rather than trusted.
PACKABLE_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
PACKABLE_ATTENTION = ("eager", "sdpa", "flash_attention_2")


def check_packable(model: nn.Module, role: str) -> None:
    """Raise ``ValueError`` naming ``role``, the model type and why, unless packing is exact for ``model``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKABLE_MODEL_TYPES:
        raise ValueError(
            f"ppo.packing: the {role} is a {model_type!r} model; packing is exact only where the model's "
            "mask comes from transformers' masking utilities, which turn restarting position_ids into a "
            f"block-diagonal mask, verified for {list(PACKABLE_MODEL_TYPES)}. Set ppo.packing=false."
        )
    attn = getattr(config, "_attn_implementation", None)
    if attn not in PACKABLE_ATTENTION:
        raise ValueError(
            f"ppo.packing: the {role} ({model_type}) uses attn_implementation={attn!r}, which does not "
            f"read packed position_ids; use one of {list(PACKABLE_ATTENTION)} or ppo.packing=false"
        )
    if attn in ("eager", "sdpa"):
        err = packed_row_error(type(config), attn)
        if err > PACKED_ROW_TOL:
            import transformers

            raise ValueError(
                f"ppo.packing: the {role} ({model_type}, attn_implementation={attn}): a two-sample packed row "
                f"differs from its padded forward by {err:.3g} (> {PACKED_ROW_TOL}) on a tiny {model_type} "
                f"model under the installed transformers {transformers.__version__}: its masking does not "
                "turn restarting position_ids into a block-diagonal mask, so packed samples would attend to "
                "each other. Upgrade transformers (tested with 5.x) or set ppo.packing=false."
            )


PACKED_ROW_TOL = 1e-4  # fp32; a leaky mask differs by ~1e-2 or more (tests/engine/rl/test_packing.py)
_PACKED_ROW_ERRORS: dict[tuple[type, str], float] = {}


def packed_row_error(config_cls: type, attn: str) -> float:
    """Max |packed - padded| of the final hidden states of a tiny fp32 base model of ``config_cls``'s
    family under ``attn``: two samples (5 and 3 tokens) in one packed row against their padded
    ``[2, 5]`` forward. What packing relies on is the installed transformers' masking (it must
    detect the restarting ``position_ids``), not the checkpoint, so a tiny model of the same
    class checks it in milliseconds; cached per (class, attention)."""
    key = (config_cls, attn)
    if key not in _PACKED_ROW_ERRORS:
        from transformers import AutoModel

        config = config_cls(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
        )
        config._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            body = AutoModel.from_config(config, attn_implementation=attn).float().eval()
            seqs = torch.randint(1, 32, (2, 5))
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        with torch.no_grad():
            padded = body(
                input_ids=seqs * mask,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                use_cache=False,
            ).last_hidden_state
            pk = pack(seqs, mask)  # one row: [1, 8], positions 0..4, 0..2
            packed = packed_hidden(body, pk)[pk.slot[mask.bool()]]
        _PACKED_ROW_ERRORS[key] = float((packed - padded[mask.bool()]).abs().max())
    return _PACKED_ROW_ERRORS[key]


@dataclass(frozen=True)
class Packed:
    """A micro-batch's real tokens in rows.

    - ``input_ids``    [R, C] long: the real tokens of rows 0..B-1, each sample contiguous in one
      row; a row's unused tail holds token 0 at positions 0, 1, ... (a block of its own)
    - ``position_ids`` [R, C] long: 0, 1, ... within each sample (``position_ids_from_mask``'s values)
    - ``slot``         [B, T] long: where each padded position sits in the flattened rows (``r * C +
      c``); -1 on padding
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    slot: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """The real tokens (the rows' tails not counted)."""
        return int((self.slot >= 0).sum())


def row_capacity(body: nn.Module, attention_mask: torch.Tensor) -> int | None:
    """The packed row length for ``body``: None (one row) under flash-attention's varlen path,
    else the padded width (dense per-row masks; see the module doc)."""
    attn = getattr(getattr(body, "config", None), "_attn_implementation", None)
    return None if attn == "flash_attention_2" else int(attention_mask.shape[1])


def pack(sequences: torch.Tensor, attention_mask: torch.Tensor, row_len: int | None = None) -> Packed:
    """``sequences``/``attention_mask`` [B, T] (any padding side) -> ``Packed`` on their device: one
    row with ``row_len`` None, else rows of ``max(row_len, longest sample)`` tokens filled first-fit
    in decreasing sample length."""
    real = attention_mask.bool()
    positions = real.long().cumsum(-1) - 1  # per-row rank of each real token
    if row_len is None:
        slot = torch.full_like(positions, -1)
        slot[real] = torch.arange(int(real.sum()), device=real.device)
        return Packed(sequences[real][None], positions[real][None], slot)
    lengths = real.sum(1).tolist()
    cap = max([row_len, *lengths])
    used: list[int] = []  # tokens placed in each row so far
    first = [0] * len(lengths)  # each sample's first flat position
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] == 0:
            continue
        r = next((r for r, u in enumerate(used) if u + lengths[i] <= cap), len(used))
        if r == len(used):
            used.append(0)
        first[i] = r * cap + used[r]
        used[r] += lengths[i]
    rows = max(len(used), 1)
    dev = real.device
    slot = torch.where(real, torch.tensor(first, device=dev)[:, None] + positions, -1)
    tail_start = torch.tensor(used or [0], device=dev)[:, None]
    flat_pos = (torch.arange(cap, device=dev)[None] - tail_start).clamp_min(0).reshape(-1)
    flat_ids = torch.zeros(rows * cap, dtype=sequences.dtype, device=dev)
    flat_ids[slot[real]] = sequences[real]
    flat_pos[slot[real]] = positions[real]
    return Packed(flat_ids.view(rows, cap), flat_pos.view(rows, cap), slot)


def packed_hidden(body: nn.Module, packed: Packed) -> torch.Tensor:
    """[R * C, H] final hidden states of an HF base model over the packed rows (block-diagonal
    attention), indexed by ``packed.slot``."""
    out = body(
        input_ids=packed.input_ids,
        attention_mask=None,  # None + restarting position_ids: transformers builds the packed mask
        position_ids=packed.position_ids,
        use_cache=False,  # with a cache the packed-sequence detection is skipped
    )
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def response_sources(packed: Packed, attention_mask: torch.Tensor, response_len: int):
    """Where the hidden states predicting the response tokens sit in the packed rows.

    Returns ``(index [M] long, valid [B, R] bool)``: ``valid`` marks response positions j whose token
    and predicting position P-1+j are both real; ``index`` lists, in ``valid``'s row-major order,
    the flat packed position of P-1+j.
    """
    T = attention_mask.shape[1]
    P = T - response_len
    real = attention_mask.bool()
    valid = real[:, P - 1 : T - 1] & real[:, P:]
    return packed.slot[:, P - 1 : T - 1][valid], valid


def response_hidden(
    body: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, response_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed forward of ``body`` over ``sequences`` [B, T]: ``(hidden [M, H], valid [B, R])``,
    the hidden states predicting the response tokens (``response_sources``) for ``unflatten``."""
    pk = pack(sequences, attention_mask, row_capacity(body, attention_mask))
    index, valid = response_sources(pk, attention_mask, response_len)
    return packed_hidden(body, pk)[index], valid


def unflatten(flat: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[M] values -> [B, R] (``valid``'s shape) with zeros elsewhere; differentiable w.r.t. ``flat``."""
    return torch.zeros(valid.shape, dtype=flat.dtype, device=flat.device).masked_scatter(valid, flat)


# --------------------------------------------------------------------------- token-budget micro-batches
def token_budget_groups(lengths: list[int], budget: int, min_groups: int = 0) -> list[list[int]]:
    """Consecutive groups of sample indices whose ``lengths`` sum to at most ``budget``.

    Greedy in order (a sample longer than ``budget`` goes alone), so concatenating the groups gives
    back 0..n-1. With ``min_groups`` > the greedy count (another rank needs more micro-batches, and
    every rank must run as many), the group with the most tokens is halved by tokens until there
    are ``min(min_groups, n)`` groups; halving keeps every group within the budget.
    """
    if budget <= 0:
        raise ValueError(f"token budget must be > 0, got {budget}")
    groups: list[list[int]] = []
    total = budget + 1
    for i, n in enumerate(lengths):
        if groups and total + n <= budget:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    while len(groups) < min(min_groups, len(lengths)):
        k = max(
            (j for j, g in enumerate(groups) if len(g) > 1), key=lambda j: sum(lengths[i] for i in groups[j])
        )
        g = groups[k]
        half, acc, cut = sum(lengths[i] for i in g) / 2, 0, 1
        for c in range(1, len(g)):  # the cut whose left part comes closest to half the tokens
            acc += lengths[g[c - 1]]
            if abs(acc - half) < abs(sum(lengths[i] for i in g[:cut]) - half):
                cut = c
        groups[k : k + 1] = [g[:cut], g[cut:]]
    return groups


def agreed_token_groups(attention_mask: torch.Tensor, budget: int) -> list[list[int]]:
    """``token_budget_groups`` of a rank's samples with the group count agreed across ranks.

    Collective: every rank must call it (ZeRO-2/3 reduce gradients in each micro-batch's backward and
    ZeRO-3 gathers weights in each forward, so all ranks run the same number of micro-batches).
    """
    from tritonrlhf.engine import distributed as D

    lengths = attention_mask.sum(1).tolist()
    groups = token_budget_groups(lengths, budget)
    return token_budget_groups(lengths, budget, int(D.all_reduce_max(len(groups))))


@dataclass(frozen=True)
class Batching:
    """How a role cuts a batch into micro-batches (``ppo.micro_batch_size`` / ``micro_batch_tokens``) and
    whether it runs them packed (``ppo.packing``).

    ``micro_batch_tokens`` 0: consecutive chunks of ``micro_batch_size`` samples; > 0: consecutive
    groups of at most that many real tokens (``token_budget_groups``), their count agreed across
    ranks when ``split(..., agree=True)``.
    """

    micro_batch_size: int
    micro_batch_tokens: int = 0
    packing: bool = False

    @classmethod
    def of(cls, spec: int | Batching) -> Batching:
        """A ``Batching`` from itself or from a plain sample count (padded, as before packing)."""
        return spec if isinstance(spec, Batching) else cls(int(spec))

    @classmethod
    def from_config(cls, ppo) -> Batching:
        """From a ``PPOAlgoConfig``."""
        return cls(ppo.micro_batch_size, ppo.micro_batch_tokens, ppo.packing)

    def groups(self, attention_mask: torch.Tensor, agree: bool = True) -> list[list[int]]:
        """The micro-batches of rows ``[B, T]`` as consecutive index lists, in sample order; with a
        token budget, ``agree`` (collective) matches their count across ranks."""
        n = attention_mask.shape[0]
        if self.micro_batch_tokens <= 0:
            step = self.micro_batch_size
            return [list(range(i, min(i + step, n))) for i in range(0, n, step)]
        if agree:
            return agreed_token_groups(attention_mask, self.micro_batch_tokens)
        return token_budget_groups(attention_mask.sum(1).tolist(), self.micro_batch_tokens)

    def split(self, exp: Experience, agree: bool = True) -> list[Experience]:
        """``exp`` as micro-batches (``groups``)."""
        if self.micro_batch_tokens <= 0:
            return exp.split(self.micro_batch_size)
        return [exp.select(g) for g in self.groups(exp.attention_mask, agree)]
