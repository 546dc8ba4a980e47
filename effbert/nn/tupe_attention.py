"""TUPE modules: the positional term (computed once per forward pass, shared by every layer) and self-attention."""

import math

import torch
from torch import nn

from ..ops import (
    t5_relative_buckets,
    tupe_attention,
    tupe_attention_varlen,
    tupe_attention_varlen_subset,
    tupe_position_bias,
)
from .linear import Linear


class _LinearBackend:
    """``backend`` as a property that the module's ``effbert.nn.Linear`` children follow
    (``"eager"`` keeps them on ``F.linear``), so setting it on the module switches the whole
    module."""

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, value):
        self._backend = value
        for module in self.children():
            if isinstance(module, Linear):
                module.backend = value


class TupePositionBias(_LinearBackend, nn.Module):
    """TUPE's untied positional logits ``P [H, N, N]`` for every layer of an encoder.

    Owns the absolute position embedding and its LayerNorm, the per-head projections U^Q and U^K, the T5 relative
    table (``num_buckets=None`` for TUPE-A, absolute only) and the [CLS] scalars (``untie_cls``). ``forward(seq_len)``
    returns ``P``, scaled by ``1/sqrt(2 * head_dim)`` as TUPE does (an encoder computes it once per forward pass and
    hands it to every layer).

    Caching across calls is opt-in (``cache=True``): in eval mode with gradients off, ``P`` is then kept per
    ``(seq_len, device, dtype)``, and every call returns a fresh copy, so a caller's in-place edit of the result never
    reaches the cache. The cache is dropped when a parameter is edited in place, replaced or loaded
    (``load_state_dict``), all of which torch's version counters see; an edit through ``.data`` bypasses them, so
    after one call ``clear_cache()``. Off by default because a cache that a silent ``.data`` edit can make stale
    must be the caller's choice.
    """

    def __init__(
        self,
        hidden_size,
        num_heads,
        max_positions=512,
        num_buckets=32,
        max_distance=128,
        untie_cls=True,
        layer_norm_eps=1e-12,
        backend="auto",
        cache=False,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})"
            )
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.num_heads, self.head_dim, self.max_positions = (
            num_heads,
            hidden_size // num_heads,
            max_positions,
        )
        self.backend = backend
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.query = Linear(hidden_size, hidden_size, backend=backend)
        self.key = Linear(hidden_size, hidden_size, backend=backend)
        if num_buckets is not None:
            self.rel_table = nn.Parameter(torch.zeros(num_buckets, num_heads))
            self.register_buffer(
                "rel_buckets",
                t5_relative_buckets(max_positions, num_buckets, max_distance),
                persistent=False,
            )
        else:
            self.rel_table, self.rel_buckets = None, None
        if untie_cls:
            self.cls_row = nn.Parameter(torch.zeros(num_heads))
            self.cls_col = nn.Parameter(torch.zeros(num_heads))
        else:
            self.cls_row = self.cls_col = None
        if not isinstance(cache, bool):
            raise TypeError(f"cache must be a bool, got {type(cache).__name__}")
        self.cache = cache
        self._cache, self._cache_key = {}, None

    def clear_cache(self):
        """Forget every cached ``P`` (needed only after a parameter edit through ``.data``)."""
        self._cache, self._cache_key = {}, None

    def _param_state(self):
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    def compute(self, seq_len):
        n, h, d = seq_len, self.num_heads, self.head_dim
        pos = self.layer_norm(self.position_embeddings.weight[:n])
        pos_q = self.query(pos).view(n, h, d)
        pos_k = self.key(pos).view(n, h, d)
        buckets = self.rel_buckets[:n, :n] if self.rel_table is not None else None
        return tupe_position_bias(
            pos_q,
            pos_k,
            scale=(2 * d) ** -0.5,
            rel_table=self.rel_table,
            rel_buckets=buckets,
            cls_row=self.cls_row,
            cls_col=self.cls_col,
            backend=self.backend,
        )

    def forward(self, seq_len):
        if (
            isinstance(seq_len, bool)
            or not isinstance(seq_len, int)
            or not 1 <= seq_len <= self.max_positions
        ):
            raise ValueError(
                f"seq_len must be an int in [1, {self.max_positions}], got {seq_len!r}"
            )
        if (
            not self.cache
            or self.training
            or torch.is_grad_enabled()
            # parameters made under torch.inference_mode() have no version counter to key on
            or any(p.is_inference() for p in self.parameters())
        ):
            self.clear_cache()
            return self.compute(seq_len)
        state = self._param_state()
        if state != self._cache_key:
            self._cache, self._cache_key = {}, state
        weight = self.position_embeddings.weight
        key = (seq_len, weight.device, weight.dtype)
        if key not in self._cache:
            self._cache[key] = self.compute(seq_len)
        return self._cache[key].clone()  # the caller's copy: editing it cannot corrupt the cache


class TupeSelfAttention(_LinearBackend, nn.Module):
    """Fused QKV projection, ``tupe_attention`` and the output projection.

    ``forward(hidden [B, N, hidden_size], pos_bias=None, attention_mask=None)`` (``attention_mask [B, N]`` bool, True
    = real token), or on packed real tokens ``forward(hidden [T, hidden_size], pos_bias, cu_seqlens=...,
    max_seqlen=..., check_offsets=True)`` (``tupe_attention_varlen``). The content logits are scaled by ``scale``; by default
    ``1/sqrt(2 * head_dim)`` when a positional term is given (TUPE's two terms share the
    scale) and ``1/sqrt(head_dim)`` without one (plain BERT). Attention dropout ``dropout`` applies in training.
    """

    def __init__(
        self,
        hidden_size,
        num_heads,
        dropout=0.0,
        scale=None,
        deterministic=False,
        backend="auto",
        head_dim=None,
    ):
        super().__init__()
        if head_dim is not None and (
            isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1
        ):
            raise ValueError(f"head_dim must be an int >= 1 or None, got {head_dim!r}")
        if head_dim is None and hidden_size % num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        # head_dim given: a head-pruned layer (effbert.models.early_bird), num_heads * head_dim < hidden_size
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        self.dropout, self.scale, self.deterministic, self.backend = (
            dropout,
            scale,
            deterministic,
            backend,
        )
        width = self.num_heads * self.head_dim
        self.qkv = Linear(hidden_size, 3 * width, backend=backend)
        self.out = Linear(width, hidden_size, backend=backend)
        # EarlyBERT (effbert.models.early_bird): per-head coefficients [H] scaling each head's slice of the
        # attention output, and which rows of a shared positional term this layer's heads read (None: all)
        self.register_parameter("head_coef", None)
        self.register_buffer("pos_heads", None)  # saved: from_pretrained of a pruned model loads it

    def _heads_pos_bias(self, pos_bias):
        """This layer's rows of the shared positional term (all of them unless heads were pruned)."""
        if pos_bias is None or self.pos_heads is None:
            return pos_bias
        return pos_bias.index_select(0, self.pos_heads)

    def _project_out(self, ctx):
        """The output projection of ``ctx [..., H, head_dim]``; with ``head_coef`` each head's slice is scaled
        first (equal to scaling that head's attention probabilities before ``@ V``)."""
        if self.head_coef is not None:
            ctx = ctx * self.head_coef.to(ctx.dtype)[:, None]
        return self.out(ctx.flatten(-2))

    def _project_qkv(self, hidden):
        """``q, k, v`` (each ``[..., hidden_size]``) from the fused projection. CPU inference runs it as three GEMMs
        on row blocks of the fused weight (views, no copy): on few tokens the three are faster than one three times
        as wide (5% at 128 tokens with MKL on two cores; equal from about 600 tokens), and the CPU attention takes
        the three outputs as they are. On the packed path of ``effbert.nn.Linear`` (CPU inference)
        it is one GEMM again: oneDNN runs the fused weight at least as fast as its three row
        blocks."""
        kind = type(self.qkv)
        if kind not in (nn.Linear, Linear) or (kind is Linear and self.qkv._use_packed(hidden)):
            # quantised or cast (quantize_for_cpu) or packed: one GEMM, no weight rows to cut
            return self.qkv(hidden).unflatten(-1, (3, -1)).unbind(-2)
        if hidden.device.type == "cpu" and not (
            torch.is_grad_enabled() and (hidden.requires_grad or self.qkv.weight.requires_grad)
        ):
            w, bias = (
                self.qkv.weight.chunk(3),
                (self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None,) * 3),
            )
            return tuple(nn.functional.linear(hidden, w[i], bias[i]) for i in range(3))
        return self.qkv(hidden).unflatten(-1, (3, -1)).unbind(-2)

    def forward(
        self,
        hidden,
        pos_bias=None,
        attention_mask=None,
        cu_seqlens=None,
        max_seqlen=None,
        check_offsets=True,
    ):
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError(
                    "give attention_mask (padded hidden) or cu_seqlens (packed hidden), not both"
                )
            return self._forward_packed(hidden, cu_seqlens, max_seqlen, pos_bias, check_offsets)
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden must be [B, N, {self.hidden_size}], got {tuple(hidden.shape)}"
            )
        b, n, _ = hidden.shape
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim) for t in self._project_qkv(hidden))
        pos_bias = self._heads_pos_bias(pos_bias)
        scale = self.scale
        if scale is None:
            scale = 1.0 / math.sqrt((2 if pos_bias is not None else 1) * self.head_dim)
        ctx = tupe_attention(
            q,
            k,
            v,
            pos_bias,
            attention_mask=attention_mask,
            scale=scale,
            dropout_p=self.dropout if self.training else 0.0,
            deterministic=self.deterministic,
            backend=self.backend,
        )
        return self._project_out(ctx.reshape(b, n, self.num_heads, self.head_dim))

    def _forward_packed(self, hidden, cu_seqlens, max_seqlen, pos_bias=None, check_offsets=True):
        """``forward`` on packed real tokens ``hidden [T, hidden_size]``, sequence ``b`` being rows
        ``cu_seqlens[b]:cu_seqlens[b + 1]`` (int32 ``[B + 1]``, positions restarting at 0: ``pos_bias [H, S, S]``
        with ``S >= max_seqlen`` is indexed by the position inside each sequence), through
        ``tupe_attention_varlen``: the projections run on real tokens only. ``check_offsets=False``: the caller
        checked ``cu_seqlens`` once (see ``tupe_attention_varlen``)."""
        if hidden.dim() != 2 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must be [T, {self.hidden_size}], got {tuple(hidden.shape)}")
        t = hidden.shape[0]
        q, k, v = (x.view(t, self.num_heads, self.head_dim) for x in self._project_qkv(hidden))
        pos_bias = self._heads_pos_bias(pos_bias)
        scale = self.scale
        if scale is None:
            scale = 1.0 / math.sqrt((2 if pos_bias is not None else 1) * self.head_dim)
        ctx = tupe_attention_varlen(
            q,
            k,
            v,
            cu_seqlens,
            max_seqlen,
            pos_bias,
            scale=scale,
            dropout_p=self.dropout if self.training else 0.0,
            deterministic=self.deterministic,
            backend=self.backend,
            check_offsets=check_offsets,
        )
        return self._project_out(ctx.reshape(t, self.num_heads, self.head_dim))

    def forward_subset(
        self,
        hidden_q,
        hidden_kv,
        cu_seqlens_q,
        cu_seqlens_k,
        position_ids_q,
        pos_bias=None,
        *,
        max_seqlen_q=None,
        max_seqlen_k=None,
        check_offsets=True,
    ):
        """Inference after token-level early exit: queries from the active tokens ``hidden_q [Tq, hidden_size]``,
        keys and values from every token ``hidden_kv [Tk, hidden_size]`` (exited tokens' frozen states included,
        projected by this layer's K/V weights, as Li et al.'s published code computes them), through
        ``tupe_attention_varlen_subset``. ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 ``[B + 1]``, ``position_ids_q
        [Tq]`` each query's position in its sequence. ``pos_bias`` None (plain BERT) attends with a zero positional
        term and scale ``1/sqrt(head_dim)``. Returns ``[Tq, hidden_size]``. No dropout, no autograd."""
        width = self.num_heads * self.head_dim
        for name, x in (("hidden_q", hidden_q), ("hidden_kv", hidden_kv)):
            if x.dim() != 2 or x.shape[-1] != self.hidden_size:
                raise ValueError(f"{name} must be [T, {self.hidden_size}], got {tuple(x.shape)}")
        pos_bias = self._heads_pos_bias(pos_bias)
        # Q for the active tokens only, K and V (one GEMM) for all of them
        if type(self.qkv) is Linear:  # packed row blocks of the fused weight in CPU inference
            q = self.qkv.forward_rows(hidden_q, 0, width)
            kv = self.qkv.forward_rows(hidden_kv, width, 3 * width)
        elif type(self.qkv) is nn.Linear:
            w, bias = self.qkv.weight, self.qkv.bias
            q = nn.functional.linear(hidden_q, w[:width], None if bias is None else bias[:width])
            kv = nn.functional.linear(hidden_kv, w[width:], None if bias is None else bias[width:])
        else:  # a quantised or cast linear (quantize_for_cpu) has no float rows to cut: sliced
            q, kv = self.qkv(hidden_q)[:, :width], self.qkv(hidden_kv)[:, width:]
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k, v = (x.reshape(-1, self.num_heads, self.head_dim) for x in kv.chunk(2, -1))
        scale = self.scale
        if scale is None:
            scale = 1.0 / math.sqrt((2 if pos_bias is not None else 1) * self.head_dim)
        if (
            pos_bias is None
        ):  # the op always takes a positional term: a zero one is plain BERT attention
            n = hidden_kv.shape[0] if max_seqlen_k is None else max_seqlen_k
            pos_bias = hidden_kv.new_zeros(1, 1, 1).expand(self.num_heads, max(n, 1), max(n, 1))
        # no CUDA C++ kernel for the subset form: a model set to "cuda" takes the best one that serves
        backend = "auto" if self.backend == "cuda" else self.backend
        ctx = tupe_attention_varlen_subset(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            position_ids_q,
            pos_bias,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            scale=scale,
            backend=backend,
            check_offsets=check_offsets,
        )
        return self._project_out(ctx.reshape(-1, self.num_heads, self.head_dim))
