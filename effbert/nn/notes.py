"""``NoteDictionary``: the TNF note dictionary as a module (DESIGN.md, "TNF")."""

import numbers

import torch
from torch import nn

from ..ops import notes as ops


class NoteDictionary(nn.Module):
    """A note per rare word, updated from the encoder output and mixed into the input embeddings.

    Buffers ``notes`` (float32 ``[num_slots, dim]``) and ``counts`` (int64 ``[num_slots]``, updates seen so far)
    are saved in the state dict. ``mix`` leaves tokens whose slot has never been updated unchanged.
    """

    def __init__(self, num_slots, dim, window=16, gamma=0.1, lam=0.5, *, device=None):
        super().__init__()
        for name, value in (("num_slots", num_slots), ("dim", dim), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name, value in (("gamma", gamma), ("lam", lam)):
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not 0.0 <= value <= 1.0
            ):
                raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}")
        self.window, self.gamma, self.lam = int(window), float(gamma), float(lam)
        self.register_buffer(
            "notes", torch.zeros(num_slots, dim, dtype=torch.float32, device=device)
        )
        self.register_buffer("counts", torch.zeros(num_slots, dtype=torch.int64, device=device))

    @property
    def num_slots(self):
        return self.notes.shape[0]

    @property
    def dim(self):
        return self.notes.shape[1]

    def extra_repr(self):
        return f"num_slots={self.num_slots}, dim={self.dim}, window={self.window}, gamma={self.gamma}, lam={self.lam}"

    def mix(self, x, slots, *, backend="auto"):
        """``note_mix(x, notes, slots, lam)`` over the slots that hold a note (``counts > 0``); differentiable in
        ``x``."""
        if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int64:
            raise TypeError(
                f"slots must be an int64 torch.Tensor, got "
                f"{slots.dtype if isinstance(slots, torch.Tensor) else type(slots).__name__}"
            )
        ops.check_slots_range(slots, self.num_slots)
        if self.num_slots == 0:
            active = torch.full_like(slots, -1)
        else:
            seen = self.counts[slots.clamp(0, self.num_slots - 1)] > 0
            active = torch.where((slots >= 0) & seen, slots, torch.full_like(slots, -1))
        return ops.note_mix(x, self.notes, active, self.lam, backend=backend)

    @torch.no_grad()
    def update(self, hidden, spans, lengths=None, process_group=None, *, backend="auto"):
        """Fold the window means of ``spans`` over ``hidden`` into the notes (``note_update_``).

        With ``process_group``, every rank gathers every rank's rows and window means and applies the same ordered
        update (rank order, then row order), so the dictionaries stay identical across data-parallel ranks. A rank
        with bad rows makes every rank raise before any rank changes its notes.
        """
        hidden = hidden.detach()
        if process_group is None:
            ops.note_update_(
                self.notes,
                self.counts,
                hidden,
                spans,
                window=self.window,
                gamma=self.gamma,
                lengths=lengths,
                backend=backend,
            )
            return
        import torch.distributed as dist

        # Argument errors (shapes, dtypes) are the same on every rank of a well-formed program: raised here.
        ops.check_update_args(
            self.notes, self.counts, hidden, spans, self.window, self.gamma, lengths
        )
        batch, seq, _ = hidden.shape
        problem = None
        try:
            ops.validate_rows(spans, batch, seq, self.num_slots, lengths)
        except ValueError as exc:
            problem = str(exc)
        world = dist.get_world_size(process_group)
        rank = dist.get_rank(process_group)
        dev = self.notes.device
        info = torch.tensor([spans.shape[0], problem is not None], dtype=torch.int64, device=dev)
        infos = [torch.empty_like(info) for _ in range(world)]
        dist.all_gather(infos, info, group=process_group)
        bad = [r for r, i in enumerate(infos) if int(i[1])]
        if bad:
            raise ValueError(
                problem
                if problem is not None
                else f"rank(s) {bad} passed bad span rows; no rank updated its notes"
            )
        sizes = [int(i[0]) for i in infos]
        most = max(sizes)
        if most == 0:
            return
        means = ops.note_window_means(
            hidden, spans, window=self.window, lengths=lengths, backend=backend
        )
        # Pad to the largest rank's row count: all_gather moves equal shapes.
        local = torch.zeros(most, self.dim + 1, dtype=torch.float64, device=dev)
        local[: sizes[rank], : self.dim] = means.to(dev, torch.float64)
        local[: sizes[rank], self.dim] = spans[:, 3].to(
            dev, torch.float64
        )  # slots < 2^53: exact in float64
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=process_group)
        rows = torch.cat([g[:n] for g, n in zip(gathered, sizes)])
        all_means = rows[:, : self.dim].to(torch.float32).contiguous()
        all_slots = rows[:, self.dim].round().to(torch.int64).contiguous()
        ops.note_fold_(
            self.notes, self.counts, all_means, all_slots, gamma=self.gamma, backend=backend
        )
