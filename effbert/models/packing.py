"""Unpadding and packed rows: where a batch's real tokens sit, worked out once per forward pass.

A batch is ``input_ids [B, N]`` with ``attention_mask [B, N]`` (1 = real token, right or left padding, holes
allowed) and optionally ``position_ids [B, N]``. Without ``position_ids`` every row holds one text; with them a row
may hold several, each starting where ``position_ids`` restarts at 0 (the convention of transformers'
``DataCollatorWithFlattening`` and flash-attn's varlen path). ``unpad_input`` gathers the real tokens in row order
into ``[total]`` and describes the texts as ``cu_seqlens`` (int32 ``[S + 1]``), as flash-attn's ``unpad_input``
does (MosaicBERT and ModernBERT run their encoders this way). Every layer then works on ``[total, hidden]`` and
attention (``tupe_attention_varlen``) stays within each text, positions restarting at 0 in each, so each text's
first token ([CLS]) is TUPE's position 0.
"""

from dataclasses import dataclass

import torch

__all__ = ["Packing", "unpad_input"]


@dataclass
class Packing:
    """Where the real tokens of a ``[B, N]`` batch sit (from ``unpad_input``).

    ``indices [total]`` int64: flat slot ``b * N + i`` of every real token, in row order (a row's texts one after
    another). ``cu_seqlens [S + 1]`` int32: text ``s`` is packed rows ``cu_seqlens[s]:cu_seqlens[s + 1]``.
    ``max_seqlen``: an int >= the longest text (the longest text in eager code; ``N`` under torch.compile, so that a
    new length does not recompile). ``positions [total]`` int64: each token's position inside its text.
    ``row_first [B]`` int64: the packed row of each batch row's first real token (``total`` for a row with none).
    A row without real tokens is an empty text when the rows are one text each; a batch without any real token
    (no row at all, or only padding) holds one empty text at least, so ``cu_seqlens`` always has >= 2 offsets.
    ``right_padded``: one text per row, its real tokens first (the padded layout runs the batch as it is).
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    positions: torch.Tensor
    row_first: torch.Tensor
    batch_size: int
    seq_len: int
    right_padded: bool

    @property
    def total(self):
        return self.indices.shape[0]

    @property
    def num_texts(self):
        return self.cu_seqlens.shape[0] - 1

    def gather(self, x):
        """``[B, N, ...]`` -> the real tokens ``[total, ...]``."""
        return x.reshape((self.batch_size * self.seq_len,) + tuple(x.shape[2:])).index_select(
            0, self.indices
        )

    def pad(self, x):
        """``[total, ...]`` -> ``[B, N, ...]`` with zeros at the padded slots (differentiable)."""
        rest = tuple(x.shape[1:])
        out = x.new_zeros((self.batch_size * self.seq_len,) + rest).index_copy(0, self.indices, x)
        return out.view((self.batch_size, self.seq_len) + rest)

    def first_tokens(self, x):
        """``[total, ...]`` -> ``[B, ...]``: each row's first real token (zeros for a row with none)."""
        return torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))]).index_select(
            0, self.row_first
        )

    # --- the padded layout: one text per row, right-padded to `rows_len` ---------------------------------------
    @property
    def rows_len(self):
        """Row length of the padded layout: ``N`` for a right-padded batch (run as given), else the longest text."""
        return self.seq_len if self.right_padded else self.max_seqlen

    def _rows_index(self):
        if self.right_padded:
            return self.indices
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        text = torch.repeat_interleave(
            torch.arange(self.num_texts, device=self.indices.device),
            lengths,
            output_size=self.total,
        )
        return text * self.rows_len + self.positions

    def rows_layout(self):
        """``(index [total], mask [S', L])`` of the padded layout: packed token ``t`` sits at flat slot
        ``index[t]`` of ``[S', L]`` (``S' = B`` and ``L = N`` for a right-padded batch, else one text per row)."""
        rows = self.batch_size if self.right_padded else self.num_texts
        index = self._rows_index()
        mask = torch.zeros(rows * self.rows_len, dtype=torch.bool, device=self.indices.device)
        mask = mask.index_fill(0, index, True).view(rows, self.rows_len)
        return index, mask

    @staticmethod
    def to_rows(x, index, mask):
        """Packed ``[total, H]`` -> ``[S', L, H]`` of ``rows_layout`` (zeros at padding)."""
        rows, length = mask.shape
        return (
            x.new_zeros(rows * length, x.shape[-1])
            .index_copy(0, index, x)
            .view(rows, length, x.shape[-1])
        )

    @staticmethod
    def from_rows(y, index):
        return y.reshape(-1, y.shape[-1]).index_select(0, index)


def _bad_position(position_ids, bad_token, indices, seq_len):
    slot = int(indices[int(bad_token)])
    b, i = divmod(slot, seq_len)
    return (
        f"position_ids must be 0 at the first real token of every row and count up by one from a restart at 0 "
        f"within each text (a restart at 0 starts a new text), got position_ids[{b}, {i}] = "
        f"{int(position_ids[b, i])}"
    )


@torch.library.custom_op("effbert::packing_nonzero", mutates_args=())
def _nonzero_op(flags: torch.Tensor) -> torch.Tensor:
    """``flags.nonzero()`` of a 1-d bool tensor, as an op whose output length is an unbacked size under
    torch.compile: the trace goes on through the packed layers (no graph break), for any number of real tokens."""
    if not isinstance(flags, torch.Tensor) or flags.dim() != 1 or flags.dtype != torch.bool:
        got = (
            f"{tuple(flags.shape)} {flags.dtype}"
            if isinstance(flags, torch.Tensor)
            else type(flags).__name__
        )
        raise ValueError(f"flags must be a 1-d bool tensor, got {got}")
    return flags.nonzero().squeeze(1)


@_nonzero_op.register_fake
def _(flags):
    return flags.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


def _nonzero(flags):
    return _nonzero_op(flags) if torch.compiler.is_compiling() else flags.nonzero().squeeze(1)


def _check_positions_args(bad, positions, position_ids, indices):
    for name, t, ndim in (
        ("bad", bad, 1),
        ("positions", positions, 1),
        ("position_ids", position_ids, 2),
        ("indices", indices, 1),
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a {ndim}-d tensor, got {got}")
    if bad.dtype != torch.bool:
        raise TypeError(f"bad must be a bool tensor, got {bad.dtype}")
    for name, t in (("positions", positions), ("indices", indices)):
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {t.dtype}")
    if (
        position_ids.is_floating_point()
        or position_ids.is_complex()
        or position_ids.dtype == torch.bool
    ):
        raise TypeError(f"position_ids must hold integers, got {position_ids.dtype}")
    total = bad.shape[0]
    if positions.shape[0] != total or indices.shape[0] != total:
        raise ValueError(
            f"bad, positions and indices must all be [total] = [{total}], got {tuple(positions.shape)} "
            f"and {tuple(indices.shape)}"
        )
    devices = {t.device for t in (bad, positions, position_ids, indices)}
    if len(devices) > 1:
        raise ValueError(
            f"bad, positions, position_ids and indices must be on one device, got "
            f"{sorted(map(str, devices))}"
        )
    if total and bool(((indices < 0) | (indices >= position_ids.numel())).any()):
        raise ValueError(f"indices must index position_ids' {position_ids.numel()} slots")


@torch.library.custom_op("effbert::packing_check_positions", mutates_args=())
def _check_positions_op(
    bad: torch.Tensor, positions: torch.Tensor, position_ids: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """The position_ids check inside a compiled graph (it runs on the real values); returns ``positions``. Its own
    arguments are checked first (it can be called directly): ``bad`` bool and ``positions`` int64, both ``[total]``;
    ``position_ids [B, N]`` integers; ``indices`` int64 ``[total]`` in ``[0, B * N)``."""
    _check_positions_args(bad, positions, position_ids, indices)
    if bool(bad.any()):
        raise ValueError(
            _bad_position(position_ids, bad.nonzero()[0, 0], indices, position_ids.shape[1])
        )
    return positions.clone()


@_check_positions_op.register_fake
def _(bad, positions, position_ids, indices):
    return torch.empty_like(positions)


def unpad_input(attention_mask, position_ids=None, *, shape, device, exact_max_seqlen=True):
    """The ``Packing`` of a batch: ``attention_mask [B, N]`` bool (True = real token; None = all real),
    ``position_ids [B, N]`` int (None = one text per row, positions 0..len-1 over its real tokens; given: a text
    starts at every real token whose position is 0 and at the first real token of every row, and positions count
    up by one within a text; padded slots' values are ignored).

    ``exact_max_seqlen=False`` gives ``max_seqlen = N`` (a bound that does not change with the lengths; what a
    compiled model uses so that a new length does not recompile). In eager code: one host read besides the
    gather's own. Under torch.compile the number of real tokens is an unbacked size (``effbert::packing_nonzero``),
    so the whole model traces as one graph that serves every ``total`` without recompiling; ``max_seqlen`` is then
    ``N``, ``right_padded`` False, and the ``position_ids`` check runs inside the graph on the real values.

    Raises ``ValueError`` naming ``position_ids`` when they do not describe texts as above.
    """
    batch, seq_len = shape
    real = (
        attention_mask
        if attention_mask is not None
        else torch.ones(shape, dtype=torch.bool, device=device)
    )
    compiling = torch.compiler.is_compiling()
    indices = _nonzero(real.reshape(-1))
    total = indices.shape[0]
    lengths = real.sum(1)
    row_start = lengths.cumsum(0) - lengths
    row_first = torch.where(lengths > 0, row_start, torch.full_like(row_start, total))
    if position_ids is None:
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        if (
            batch == 0
        ):  # no row: one empty text, so that cu_seqlens holds the two offsets attention takes
            cu = torch.zeros(2, dtype=torch.int64, device=device)
        positions = (real.long().cumsum(1) - 1).reshape(-1).index_select(0, indices)
        bad = None
    else:
        positions = position_ids.reshape(-1).index_select(0, indices).long()
        first = torch.zeros(total + 1, dtype=torch.bool, device=device)
        first = first.index_fill(0, row_first, True)[:total]
        starts = (positions == 0) | first
        prev = torch.cat([positions.new_full((1,), -1), positions[:-1]])
        bad = torch.where(starts, positions != 0, positions != prev + 1)
        # the first real token is always a start (packed row 0): the offsets are 0, the other starts, total; with
        # no real token at all that is [0, 0], one empty text (written so that it traces: no branch on total)
        zero = torch.zeros(1, dtype=torch.int64, device=device)
        cu = torch.cat([zero, _nonzero(starts[1:]) + 1, zero + total])
    cu_seqlens = cu.to(torch.int32)
    if compiling:  # no host read: bounds that hold for any lengths
        if bad is not None:
            positions = torch.ops.effbert.packing_check_positions(
                bad, positions, position_ids, indices
            )
        return Packing(
            indices=indices,
            cu_seqlens=cu_seqlens,
            max_seqlen=seq_len,
            positions=positions,
            row_first=row_first,
            batch_size=batch,
            seq_len=seq_len,
            right_padded=False,
        )
    seqlens = cu[1:] - cu[:-1]
    prefix = (real == (torch.arange(seq_len, device=device) < lengths[:, None])).all()
    if bad is None:
        one_text = torch.ones((), dtype=torch.bool, device=device)
    elif cu.shape[0] != batch + 1:
        one_text = torch.zeros((), dtype=torch.bool, device=device)
    else:
        one_text = (cu[:-1] == row_start).all()
    any_bad = (
        bad.any() if bad is not None and total else torch.zeros((), dtype=torch.bool, device=device)
    )
    longest = (
        seqlens.max() if seqlens.numel() else torch.zeros((), dtype=torch.int64, device=device)
    )
    longest, is_bad, is_prefix, is_one = torch.stack(
        [longest, any_bad.long(), prefix.long(), one_text.long()]
    ).tolist()  # the one host read
    if is_bad:
        raise ValueError(_bad_position(position_ids, bad.nonzero()[0, 0], indices, seq_len))
    max_seqlen = max(int(longest), 1) if exact_max_seqlen else seq_len
    return Packing(
        indices=indices,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        positions=positions,
        row_first=row_first,
        batch_size=batch,
        seq_len=seq_len,
        right_padded=bool(is_prefix and is_one),
    )
