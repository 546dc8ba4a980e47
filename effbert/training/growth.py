"""CompoundGrow's schedule under ``transformers.Trainer`` (Gu et al., NAACL 2021; official code:
google-research/google-research ``grow_bert/progressive``, a ``ProgressivePolicy`` whose stages each
build a model, transform the previous stage's weights into it and build a fresh optimizer).

The SPEC (``effbert pretrain --grow SPEC``) is a comma-separated list of growths
``DIM=FROM->TO@STEP``:

- ``layers=3->6@500``: the encoder is stacked from 3 to 6 layers after optimizer step 500;
- ``ffn=512->1024@500``: every layer's FFN is tiled from 512 to 1024 hidden units (a multiple);
- ``pool=4->1@800``: the input is pooled by 4 (``effbert.models.growth.pooled_mlm_forward``) until
  step 800, then runs at full length (``TO`` must be 1: pooling is dropped, as ``grow_bert``'s last
  stage does).

Growths sharing a step happen together (the compound growth); one dimension may grow several times
(``layers=2->4@300,layers=4->8@600``), each ``FROM`` the previous ``TO``. The model is built with
the first ``FROM`` of each dimension (``GrowthSchedule.initial_config``) and ends at the given
config's sizes.

``GrowthCallback`` grows the model in place at the end of the step (the same ``nn.Module``, so the
Trainer's references stay valid) and rebuilds the optimizer's parameter groups in place: with
``optimizer_state="fresh"`` (the default, as the published code starts a new optimizer each stage)
Adam's moments and step counts restart; with ``"grow"`` they grow with the same operators as the
weights (``effbert.models.growth.grow_adam_state``; allenai/staged-training's way), exact for the
function-preserving FFN tiling and a copy for stacked layers. "fresh" stays the default because it
is the published method; on the licence-text benchmark (benchmarks/compound_grow_real_text.py,
400 steps) "grow" ended closer to the baseline (held-out 5.107 against 5.147 with "fresh", baseline
5.093), as the copied moments soften the loss jump at the stacking. The learning-rate schedule is
the Trainer's one schedule over the whole run (``grow_bert`` builds a schedule per stage; a single
one keeps ``--max-steps`` and ``--warmup-*`` meaning what they mean without growth).

Checkpoints saved after a growth hold the grown model (its config too); to resume, call
``prepare_for_resume(model, schedule, checkpoint)`` before
``trainer.train(resume_from_checkpoint=...)``: it grows the freshly built small model to the
checkpoint's shape so the Trainer can load the weights and the optimizer state into it. Each growth
is appended to ``OUT/growth.jsonl`` (``read_growth_log``), which the loss plot marks
(``mark_growth``).
"""

import dataclasses
import json
import logging
import os
import re
from collections import defaultdict

from transformers import TrainerCallback

from ..models import growth as ops

__all__ = [
    "Growth",
    "GrowthSchedule",
    "parse_grow_spec",
    "GrowthCallback",
    "prepare_for_resume",
    "read_growth_log",
    "mark_growth",
    "GROWTH_LOG",
    "DIMENSIONS",
]

logger = logging.getLogger(__name__)

GROWTH_LOG = "growth.jsonl"
DIMENSIONS = ("layers", "ffn", "pool")
_ITEM = re.compile(r"^\s*([a-z]+)\s*=\s*(\d+)\s*->\s*(\d+)\s*@\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Growth:
    """One dimension growing ``start -> end`` at the end of optimizer step ``step``."""

    dim: str
    start: int
    end: int
    step: int


class GrowthSchedule:
    """The parsed SPEC (see the module docstring). ``growths`` in step order; ``steps`` the distinct
    growth steps. Raises ``ValueError`` naming the item for a malformed or inconsistent SPEC."""

    def __init__(self, growths):
        growths = sorted(growths, key=lambda g: (g.step, DIMENSIONS.index(g.dim)))
        if not growths:
            raise ValueError("spec must name at least one growth, e.g. 'layers=3->6@500'")
        last = {}
        for g in growths:
            item = f"{g.dim}={g.start}->{g.end}@{g.step}"
            if g.step < 1:
                raise ValueError(f"spec item {item!r}: the step must be >= 1")
            if g.start < 1 or g.end < 1:
                raise ValueError(f"spec item {item!r}: sizes must be >= 1")
            if g.dim in last:
                prev = last[g.dim]
                if prev.step == g.step:
                    raise ValueError(f"spec item {item!r}: {g.dim} already grows at step {g.step}")
                if prev.end != g.start:
                    raise ValueError(
                        f"spec item {item!r}: {g.dim} starts at {g.start}, but the "
                        f"previous growth "
                        f"ends at {prev.end}"
                    )
            if g.dim == "pool":
                if g.end != 1 or g.start < 2:
                    raise ValueError(
                        f"spec item {item!r}: pool grows from a pooling size >= 2 to 1 (no pooling)"
                    )
            elif g.end <= g.start:
                raise ValueError(f"spec item {item!r}: {g.dim} must grow (TO > FROM)")
            elif g.dim == "ffn" and g.end % g.start:
                raise ValueError(
                    f"spec item {item!r}: ffn grows by tiling: TO must be a multiple of FROM"
                )
            last[g.dim] = g
        self.growths = tuple(growths)
        self.steps = tuple(sorted({g.step for g in growths}))

    @classmethod
    def parse(cls, spec):
        """``GrowthSchedule`` from a SPEC string."""
        if not isinstance(spec, str):
            raise TypeError(f"spec must be a str, got {type(spec).__name__}")
        growths = []
        for raw in spec.split(","):
            m = _ITEM.match(raw)
            if not m:
                raise ValueError(
                    f"spec item {raw.strip()!r} must read DIM=FROM->TO@STEP "
                    f"(DIM one of "
                    f"{', '.join(DIMENSIONS)}), e.g. 'layers=3->6@500'"
                )
            dim, start, end, step = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
            if dim not in DIMENSIONS:
                raise ValueError(
                    f"spec item {raw.strip()!r}: DIM must be one of {', '.join(DIMENSIONS)}"
                )
            growths.append(Growth(dim, start, end, step))
        return cls(growths)

    def __repr__(self):
        return (
            "GrowthSchedule("
            + ",".join(f"{g.dim}={g.start}->{g.end}@{g.step}" for g in self.growths)
            + ")"
        )

    def sizes_at(self, step):
        """``{dim: size}`` in force after optimizer step ``step`` (growths at ``step`` included); a
        dimension that never grows is absent."""
        sizes = {}
        for g in self.growths:
            sizes.setdefault(g.dim, g.start)
            if g.step <= step:
                sizes[g.dim] = g.end
        return sizes

    def at(self, step):
        """The growths that happen at the end of step ``step``."""
        return [g for g in self.growths if g.step == step]

    def initial_config(self, config):
        """A copy of ``config`` (the final model's ``TupeBertConfig``) with the first sizes of the
        schedule. Raises ``ValueError`` if the schedule does not end at ``config``'s sizes."""
        final = self.sizes_at(max(self.steps))
        fields = {"layers": "num_hidden_layers", "ffn": "intermediate_size"}
        for dim, field in fields.items():
            if dim in final and final[dim] != getattr(config, field):
                raise ValueError(
                    f"spec ends {dim} at {final[dim]}, but the model's {field} is "
                    f"{getattr(config, field)}"
                )
        first = self.sizes_at(0)
        small = config.__class__.from_dict(config.to_dict())
        for dim, field in fields.items():
            if dim in first:
                setattr(small, field, first[dim])
        return small


def parse_grow_spec(spec):
    """``GrowthSchedule.parse(spec)``."""
    return GrowthSchedule.parse(spec)


def _apply(model, growths):
    """The growths (one step's) on ``model`` in place; returns the parameter map
    (``grow_model``)."""
    sizes = {g.dim: g for g in growths}
    mapping = ops.grow_model(
        model,
        num_layers=sizes["layers"].end if "layers" in sizes else None,
        intermediate_size=sizes["ffn"].end if "ffn" in sizes else None,
    )
    if "pool" in sizes:
        ops.set_input_pooling(model, sizes["pool"].end)
    return mapping


def _shape(model):
    return {
        "layers": len(model.bert.encoder.layers),
        "ffn": model.config.intermediate_size,
        "pool": ops.input_pooling(model),
    }


def prepare_for_resume(model, schedule, checkpoint):
    """Grows a freshly built small ``model`` (in place) to the shape it has after the step of
    ``checkpoint`` (a Trainer checkpoint folder, read from its ``trainer_state.json``; or an int
    step), and sets the input pooling in force then, so
    ``trainer.train(resume_from_checkpoint=checkpoint)`` loads into it. Returns the step. Raises
    ``ValueError`` / ``FileNotFoundError`` for a bad checkpoint, ``TypeError`` for a bad model or
    schedule."""
    if not isinstance(schedule, GrowthSchedule):
        raise TypeError(f"schedule must be a GrowthSchedule, got {type(schedule).__name__}")
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, (int, str, os.PathLike)):
        raise TypeError(f"checkpoint must be a folder or a step, got {type(checkpoint).__name__}")
    if isinstance(checkpoint, int):
        step = checkpoint
    else:
        path = os.path.join(checkpoint, "trainer_state.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {checkpoint!r} has no trainer_state.json")
        with open(path) as f:
            step = int(json.load(f)["global_step"])
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    ops._check_model(model)
    first = {k: v for k, v in schedule.sizes_at(0).items() if k != "pool"}
    if _shape(model) != {**_shape(model), **first}:
        raise ValueError(f"model must have the schedule's first sizes {first}, got {_shape(model)}")
    if "pool" in schedule.sizes_at(0):
        ops.set_input_pooling(model, schedule.sizes_at(0)["pool"])
    for s in schedule.steps:
        if s <= step:
            _apply(model, schedule.at(s))
    return step


def _regroup(optimizer, model, old_named, mapping, optimizer_state):
    """The optimizer's groups rebuilt in place for the grown ``model``: each new parameter joins its
    source's group, in ``model.named_parameters()`` order (the order Trainer's ``create_optimizer``
    gives, so a checkpoint's optimizer state loads by index after a resume); the state restarts or
    grows."""
    opt = getattr(
        optimizer, "optimizer", optimizer
    )  # accelerate's AcceleratedOptimizer wraps the torch one
    group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    groups = [[] for _ in opt.param_groups]
    new_named = {}
    for name, p in model.named_parameters():
        source = old_named.get(mapping[name].source)
        if source is None or id(source) not in group_of:
            continue  # frozen: not in the optimizer
        groups[group_of[id(source)]].append(p)
        new_named[name] = p
    state = (
        ops.grow_adam_state(opt.state, old_named, new_named, mapping)
        if optimizer_state == "grow"
        else {}
    )
    for group, params in zip(opt.param_groups, groups):
        group["params"] = params
    opt.state = defaultdict(dict, state)


class GrowthCallback(TrainerCallback):
    """Grows the model at the schedule's steps (see the module docstring).

    ``schedule``: a ``GrowthSchedule`` (or a SPEC string); ``optimizer_state``: ``"fresh"``
    (default; the published code's new optimizer per stage) or ``"grow"``. ``events`` lists the
    growths done in this process, each ``{"step", "growth", "params_before", "params_after"}``;
    ``growth_steps`` the schedule's steps. Each event is appended to ``LOG_DIR/growth.jsonl`` on
    the main process (``log_dir``: default the Trainer's ``output_dir``; ``effbert pretrain`` gives
    its run folder). The model must be a ``TupeBertForMaskedLM`` built with the schedule's first
    sizes (and, when resuming, grown by ``prepare_for_resume``): ``on_train_begin`` checks it and
    raises ``ValueError`` otherwise."""

    def __init__(self, schedule, optimizer_state="fresh", log_dir=None):
        if isinstance(schedule, str):
            schedule = GrowthSchedule.parse(schedule)
        if not isinstance(schedule, GrowthSchedule):
            raise TypeError(
                f"schedule must be a GrowthSchedule or a SPEC string, got {type(schedule).__name__}"
            )
        if optimizer_state not in ("fresh", "grow"):
            raise ValueError(f"optimizer_state must be 'fresh' or 'grow', got {optimizer_state!r}")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a folder path or None, got {type(log_dir).__name__}")
        self.schedule, self.optimizer_state = schedule, optimizer_state
        self.log_dir = log_dir
        self.events = []

    @property
    def growth_steps(self):
        return list(self.schedule.steps)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model)
        step = state.global_step
        if step == 0 and "pool" in self.schedule.sizes_at(0) and ops.input_pooling(model) == 1:
            ops.set_input_pooling(model, self.schedule.sizes_at(0)["pool"])
        want = {**_shape(model), **self.schedule.sizes_at(step)}
        if _shape(model) != want:
            raise ValueError(
                f"model must have the sizes {want} at step {step}, "
                f"got {_shape(model)}: build it with GrowthSchedule.initial_config "
                f"and, to resume, call "
                f"prepare_for_resume first"
            )
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        growths = self.schedule.at(state.global_step)
        if not growths:
            return control
        model = _unwrap(model)
        before = ops.count_parameters(model)
        old_named = dict(model.named_parameters())
        mapping = _apply(model, growths)
        if optimizer is not None:
            _regroup(optimizer, model, old_named, mapping, self.optimizer_state)
        text = ",".join(f"{g.dim}={g.start}->{g.end}" for g in growths)
        event = {
            "step": state.global_step,
            "growth": text,
            "params_before": before,
            "params_after": ops.count_parameters(model),
            "optimizer_state": self.optimizer_state,
        }
        self.events.append(event)
        logger.info(
            "growth at step %d: %s (%d -> %d parameters)",
            state.global_step,
            text,
            before,
            event["params_after"],
        )
        where = self.log_dir if self.log_dir is not None else args.output_dir
        if state.is_world_process_zero and where:
            os.makedirs(where, exist_ok=True)
            with open(os.path.join(where, GROWTH_LOG), "a") as f:
                f.write(json.dumps(event) + "\n")
        return control


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def read_growth_log(out):
    """The growth events of run folder ``out`` (``growth.jsonl``), one per step (a step re-run after
    a resume counts once), in step order; ``[]`` when there is none."""
    path = os.path.join(os.fspath(out), GROWTH_LOG)
    if not os.path.isfile(path):
        return []
    events = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                events[record["step"]] = record
    return [events[s] for s in sorted(events)]


def mark_growth(ax, events, **kwargs):
    """Draws a dashed vertical line on matplotlib ``ax`` at each growth step (``events``: ints or
    the dicts of ``read_growth_log``, whose text labels the line). ``kwargs`` go to
    ``ax.axvline``."""
    style = dict(color="grey", linestyle="--", linewidth=0.8)
    style.update(kwargs)
    for e in events:
        step = e["step"] if isinstance(e, dict) else e
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise TypeError(f"events must hold steps or growth records, got {e!r}")
        ax.axvline(step, **style)
        if isinstance(e, dict):
            ax.annotate(
                e.get("growth", ""),
                (step, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                rotation=90,
                va="top",
                ha="right",
            )
