"""A static-KV-cache decode loop for Llama-family causal LMs: the HF rollout backend's fast path.

At rollout batch sizes (a few dozen rows) transformers' ``generate`` spends most of a decode step
around the matmuls: a cache that grows by concatenation, a 4-D mask rebuilt every step, one
Python object per processor, and seven projections per layer. :class:`StaticDecoder` runs the
same weights through a loop that does only the model's arithmetic:

- one preallocated key/value cache per layer, written in place;
- the q/k/v projections as one matmul and gate/up as one (the weights concatenated per call,
  so the loop always reads the model's current weights, whoever updated them);
- rows that stopped leave the batch (their cache rows are dropped), so a batch of mixed lengths
  costs what its live rows cost.

It computes what the model's own forward computes (RMSNorm with the model's weights and epsilon,
the model's rotary embedding module and activation, its attention scaling, position ids from the
attention mask, sdpa attention) for the families whose decoder layer it knows: ``llama``,
``mistral``, ``qwen2`` (q/k/v biases) and ``qwen3`` (per-head q/k norms). :func:`unsupported` says why any other model, or a model it
can't read, is left to ``generate``; and at construction the loop is checked against the model's
own forward on a small batch (:meth:`StaticDecoder.self_check`), so a variant it does not know
about is refused rather than decoded wrongly. Sampling is the caller's: ``generate`` hands each
step's next-token logits to a ``choose`` callback.

On CUDA the per-token work outside the matmuls (about 70 small launches per token: norms, rotary,
cache writes, masks) is what a CUDA graph removes. ``generate(step="graph")`` decodes with one
fixed-shape step -- every row stays in the batch, the key/value caches are attended over their
whole length under a mask, the cache column is a tensor -- captured once per call and replayed
per token; ``step="fixed"`` runs that same step eagerly (how CPU tests check it against the
shrinking loop, ``step="loop"``). :func:`decode_step` picks the step for ``rollout.cuda_graph``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

# choose(logits[b, V] float32, rows[b] (indices into the batch), step t, tokens[B, T] (columns < t
# filled; pad after a row's stop)) -> (tokens[b], logprobs[b])
Chooser = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def unsupported(model: nn.Module) -> str | None:
    """Why :class:`StaticDecoder` can't run ``model`` (None: it can)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        return f"model_type {kind!r} is not one of {', '.join(FAMILIES)}"
    inner = getattr(model, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, p) for p in parts):
        return f"{type(model).__name__} has no .model with {', '.join(parts)}"
    if type(model.get_output_embeddings()) is not nn.Linear:
        return "its LM head is not an nn.Linear"
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return "it is quantized"
    if any(p.numel() == 0 for p in model.parameters()):
        return "its parameters are partitioned (ZeRO-3)"
    rope = getattr(inner.rotary_emb, "rope_type", None)
    if not isinstance(rope, str) or "dynamic" in rope or "longrope" in rope:
        # cos/sin are computed once per decode, so they must not depend on the sequence length
        return f"its rotary embedding ({rope!r}) rescales with the sequence length"
    norms = [inner.norm] + [
        m for layer in inner.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    if not all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms):
        return "its norms are not RMSNorm(weight, variance_epsilon)"
    for i, layer in enumerate(inner.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        mods = [getattr(attn, n, None) for n in _PROJ] + [getattr(mlp, n, None) for n in _MLP]
        if any(type(m) is not nn.Linear for m in mods):
            return f"layer {i}'s attention or MLP projections are not plain nn.Linear"
        if any(getattr(mlp, n).bias is not None for n in _MLP):
            return f"layer {i}'s MLP has biases"
        if not hasattr(attn, "scaling") or not hasattr(attn, "head_dim"):
            return f"layer {i}'s attention has no scaling/head_dim"
    return None


STEPS = ("loop", "fixed", "graph")


def decode_step(setting: str, device: torch.device) -> tuple[str, str]:
    """The decode step for ``rollout.cuda_graph`` (``auto`` | ``on`` | ``off``) on ``device``:
    (``"graph"`` or ``"loop"``, the reason in words). ``on`` off CUDA raises ValueError."""
    if setting == "off":
        return "loop", "rollout.cuda_graph=off"
    if device.type != "cuda":
        why = f"the model is on {device.type}, and CUDA graphs need a CUDA device"
        if setting == "on":
            raise ValueError(f"rollout.cuda_graph=on: {why}")
        return "loop", why
    return "graph", f"rollout.cuda_graph={setting} on {device}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The transformers RMSNorm ``weight * x / rms(x)`` as torch's fused op (one call, not seven)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


class StaticDecoder:
    """Sampling decode of a Llama-family ``model`` (see the module doc) with a static KV cache."""

    def __init__(self, model: nn.Module, check: bool = True):
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"the static-cache decoder can't run {type(model).__name__}: {why}")
        self.model = model
        self.inner = model.model
        cfg = model.config
        attn = self.inner.layers[0].self_attn
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.qk_norm = hasattr(attn, "q_norm")
        # Sliding-window layers attend like full ones while the whole sequence fits the window.
        windows = [getattr(layer.self_attn, "sliding_window", None) for layer in self.inner.layers]
        if cfg.model_type == "mistral":
            windows = [getattr(cfg, "sliding_window", None)] * len(windows)
        self.window = min((w for w in windows if w), default=None)
        if check:
            self.self_check()

    def fits(self, length: int) -> bool:
        """Whether a sequence of ``length`` tokens decodes exactly (within every sliding window)."""
        return self.window is None or length <= self.window

    # ------------------------------------------------------------------ weights
    def _weights(self) -> list[tuple]:
        """Per layer, read now and laid out [in, out] (a small-batch matmul streams a contiguous
        [in, out] weight faster than nn.Linear's [out, in]): (q|k|v, its bias or None, o, o's bias
        or None, gate|up, down)."""
        out = []
        for layer in self.inner.layers:
            a, m = layer.self_attn, layer.mlp
            projs = (a.q_proj, a.k_proj, a.v_proj)
            qkv = torch.cat([p.weight for p in projs]).t().contiguous()
            qkv_b = None
            if any(p.bias is not None for p in projs):
                qkv_b = torch.cat(
                    [p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projs]
                )
            gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight]).t().contiguous()
            o = a.o_proj.weight.t().contiguous()
            out.append((qkv, qkv_b, o, a.o_proj.bias, gate_up, m.down_proj.weight.t().contiguous()))
        return out

    # ------------------------------------------------------------------ forward
    def _layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        caches: list[tuple[torch.Tensor, torch.Tensor]],
        start: int | torch.Tensor,
        attn_mask: torch.Tensor,
        weights: list[tuple],
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """``x`` [b, n, H] at ``positions`` [b, n] through every layer, writing keys/values into
        ``caches`` at ``start .. start+n`` and attending to ``0 .. start+n`` under ``attn_mask``
        (bool, broadcastable to [b, heads, n, start+n]); ``rope``: cos and sin of every position,
        [total, head_dim] each. Returns the final-normed hidden states. A tensor ``start`` ([1],
        n = 1: the fixed-shape step) writes that column and attends over the whole cache, so the
        shapes never change (``attn_mask`` then spans the cache: [b, 1, 1, total])."""
        b, n, _ = x.shape
        # One additive mask for every layer (sdpa would convert a bool mask in each call).
        attn_mask = torch.zeros(attn_mask.shape, dtype=x.dtype, device=x.device).masked_fill_(
            ~attn_mask, float("-inf")
        )
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        cos, sin = rope[0][positions][:, :, None], rope[1][positions][:, :, None]  # [b, n, 1, hd]
        fixed = isinstance(start, torch.Tensor)
        end = None if fixed else start + n
        for layer, (qkv_w, qkv_b, o_w, o_b, gate_up, down), (kc, vc) in zip(
            self.inner.layers, weights, caches
        ):
            h = _rms_norm(layer.input_layernorm, x)
            qkv = h @ qkv_w if qkv_b is None else torch.addmm(qkv_b, h.view(b * n, -1), qkv_w).view(b, n, -1)
            qk, v = qkv.split([(nh + nkv) * hd, nkv * hd], dim=-1)
            qk, v = qk.view(b, n, nh + nkv, hd), v.view(b, n, nkv, hd)
            if self.qk_norm:
                a = layer.self_attn
                qk = torch.cat(
                    [_rms_norm(a.q_norm, qk[:, :, :nh]), _rms_norm(a.k_norm, qk[:, :, nh:])], dim=2
                )
            qk = qk * cos + _rotate_half(qk) * sin  # q and k rotate together
            q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)
            if fixed:
                kc.index_copy_(2, start, k)
                vc.index_copy_(2, start, v.transpose(1, 2))
            else:
                kc[:, :, start:end] = k
                vc[:, :, start:end] = v.transpose(1, 2)
            o = F.scaled_dot_product_attention(
                q, kc[:, :, :end], vc[:, :, :end], attn_mask=attn_mask, scale=self.scaling,
                enable_gqa=nkv != nh,
            )  # fmt: skip
            o = o.transpose(1, 2).reshape(b, n, nh * hd) @ o_w
            x = x + (o if o_b is None else o + o_b)
            h = _rms_norm(layer.post_attention_layernorm, x)
            gate, up = (h @ gate_up).chunk(2, dim=-1)
            x = x + (layer.mlp.act_fn(gate) * up) @ down
        return _rms_norm(self.inner.norm, x)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden).float()

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        choose: Chooser,
        stop_ids: Sequence[int],
        pad_id: int,
        step: str = "loop",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode up to ``max_new_tokens`` after left-padded prompts ``ids`` [B, W] (``attention_mask``
        1 on real tokens). Each step ``choose`` picks the live rows' tokens from their next-token
        logits; a row stops after a ``stop_ids`` token. Returns (tokens [B, T], log-probs [B, T]):
        ``pad_id`` / 0 after a row's stop; T <= ``max_new_tokens`` (the longest row).
        ``step``: ``loop`` (stopped rows leave the batch), ``fixed`` (the fixed-shape step, eager)
        or ``graph`` (that step as a CUDA graph; CUDA only)."""
        if step not in STEPS:
            raise ValueError(f"step must be one of {', '.join(STEPS)}, got {step!r}")
        B, W = ids.shape
        dev, dt = ids.device, self.model.get_output_embeddings().weight.dtype
        total = W + max_new_tokens
        if not self.fits(total):
            raise ValueError(f"{total} tokens exceed the model's sliding window ({self.window})")
        weights = self._weights()
        # cos/sin of every position once (the rotary module's own values; its type is static)
        probe = torch.empty(0, dtype=dt, device=dev)
        cos, sin = self.inner.rotary_emb(probe, torch.arange(total, device=dev)[None])
        rope = (cos[0], sin[0])
        shape = (B, self.n_kv, total, self.head_dim)
        # The fixed step reads the whole cache under a mask: unwritten entries must be finite.
        alloc = torch.empty if step == "loop" else torch.zeros
        caches = [(alloc(shape, dtype=dt, device=dev), alloc(shape, dtype=dt, device=dev))
                  for _ in weights]  # fmt: skip
        real = attention_mask.bool()
        valid = torch.zeros(B, total, dtype=torch.bool, device=dev)  # which cached keys are real
        valid[:, :W] = real
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        # Prefill: causal over real keys; a padding query also sees itself (no all-masked row).
        causal = torch.ones(W, W, dtype=torch.bool, device=dev).tril()
        mask = (causal & real[:, None, :]) | torch.eye(W, dtype=torch.bool, device=dev)
        x = self.inner.embed_tokens(ids)
        logits = self._logits(self._layers(x, positions, caches, 0, mask[:, None], weights, rope)[:, -1])
        tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        logps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=dev)
        rows = torch.arange(B, device=dev)
        pos = positions[:, -1] + 1
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
        if step != "loop":
            state = (caches, valid, pos, weights, rope)
            return self._decode_fixed(logits, tokens, logps, W, state, choose, stops, step == "graph")
        steps = 0
        for t in range(max_new_tokens):
            tok, lp = choose(logits, rows, t, tokens)
            tokens[rows, t], logps[rows, t] = tok, lp
            steps = t + 1
            done = torch.isin(tok, stops)
            if t == max_new_tokens - 1:
                break
            if bool(done.any()):
                live = ~done
                if not bool(live.any()):
                    break
                rows, tok, pos, valid = rows[live], tok[live], pos[live], valid[live]
                caches = [(k[live], v[live]) for k, v in caches]
            valid[:, W + t] = True
            x = self.inner.embed_tokens(tok[:, None])
            key_mask = valid[:, None, None, : W + t + 1]
            logits = self._logits(
                self._layers(x, pos[:, None], caches, W + t, key_mask, weights, rope)[:, -1]
            )
            pos = pos + 1
        return tokens[:, :steps], logps[:, :steps]

    def _decode_fixed(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        logps: torch.Tensor,
        width: int,
        state: tuple,
        choose: Chooser,
        stops: torch.Tensor,
        graph: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode after prefill with one fixed-shape step (see the module doc): every row stays
        in the batch (a stopped row's results are dropped), so the step's inputs are static
        buffers -- token [B], position [B], cache column [1], valid keys [B, total] -- that a CUDA
        graph (``graph``) captures once and replays per token. ``logits`` [B, V]: the prefill's."""
        caches, valid, pos, weights, rope = state
        B, max_new = tokens.shape
        dev = tokens.device
        tok_in = torch.zeros(B, dtype=torch.long, device=dev)
        col = torch.full((1,), width, dtype=torch.long, device=dev)
        key_mask = valid[:, None, None, :]

        def run() -> torch.Tensor:
            x = self.inner.embed_tokens(tok_in[:, None])
            return self._logits(self._layers(x, pos[:, None], caches, col, key_mask, weights, rope)[:, -1])

        captured, out = None, None
        rows = torch.arange(B, device=dev)
        steps = 0
        for t in range(max_new):
            tok, lp = choose(logits if rows.numel() == B else logits[rows], rows, t, tokens)
            tokens[rows, t], logps[rows, t] = tok, lp
            steps = t + 1
            if t == max_new - 1:
                break
            tok_in.index_copy_(0, rows, tok)
            done = torch.isin(tok, stops)
            if bool(done.any()):
                rows = rows[~done]
                if rows.numel() == 0:
                    break
            valid[:, width + t] = True
            col.fill_(width + t)
            if not graph:
                logits = run()
            else:
                if captured is None:
                    captured, out = _capture(run)
                captured.replay()
                logits = out
            pos += 1
        return tokens[:, :steps], logps[:, :steps]

    # ------------------------------------------------------------------ check
    @torch.no_grad()
    def self_check(self, atol: float | None = None) -> None:
        """Greedy-decode a small left-padded batch and compare each step's log-probs with the model's
        own forward over the whole sequence; raises ValueError if they differ by more than ``atol``
        (a layer variant this loop does not reproduce). Default: 1e-3 in fp32 (measured ~1e-6),
        0.1 in 16 bits (measured ~2e-3 on 2 layers; rounding grows with depth)."""
        weight = self.model.get_output_embeddings().weight
        dev = weight.device
        if atol is None:
            atol = 1e-3 if weight.dtype == torch.float32 else 0.1
        vocab = self.model.get_output_embeddings().weight.shape[0]
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, 5), generator=gen).to(dev)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0

        def greedy(logits, rows, t, tokens):
            lp = logits.log_softmax(-1)
            tok = lp.argmax(-1)
            return tok, lp.gather(-1, tok[:, None])[:, 0]

        was_training = self.model.training
        self.model.eval()
        try:
            tokens, logps = self.generate(ids, mask, 3, greedy, [], 0)
            full = torch.cat([ids, tokens], 1)
            fmask = torch.cat([mask, torch.ones_like(tokens)], 1)
            out = self.model(
                input_ids=full,
                attention_mask=fmask,
                position_ids=(fmask.cumsum(-1) - 1).clamp_min(0),
                use_cache=False,
            )
        finally:
            self.model.train(was_training)
        ref = out.logits[:, 4:-1].float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        gap = float((ref - logps).abs().max())
        if not gap <= atol:
            raise ValueError(
                f"the static-cache decoder disagrees with {type(self.model).__name__}'s forward "
                f"(log-prob gap {gap:.2e} > {atol:g}); this variant needs transformers' generate"
            )


def _capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``fn`` (reading and writing only static buffers) captured as a CUDA graph: (graph, its
    output buffer). Warmed up on a side stream first, as capture requires; the warm-up runs write
    what the first replay writes again (the same column, the same inputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
