"""Official TUPE (fairseq) checkpoints: a state dict in fairseq's layout, converted, equals a float64
re-implementation of TUPE's own fairseq forward (guolinke/TUPE: transformer_sentence_encoder.py,
multihead_attention.py, transformer_sentence_encoder_layer.py, models/bert/model.py) on real tokens.

The fake state dicts use the key names and shapes of TUPE's merged code (``pos_q_linear`` / ``pos_k_linear``, no
``rp_bucket`` entry: TUPE keeps it as a plain attribute) or, as ``layout="pr20"``, those of the unmerged pull request
guolinke/TUPE#20 (one ``pos_proj`` and a stored ``rp_bucket``)."""

import argparse
import collections
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from effbert.integrations.tupe_fairseq import (
    config_from_tupe_fairseq,
    from_tupe_fairseq,
    tupe_fairseq_state_dict_to_effbert,
)

from helpers import FP32_RTOL, assert_close

V, D, H, L, FFN, MAX_LEN, BINS, PAD = 23, 32, 2, 2, 40, 20, 32, 1
P = "decoder.sentence_encoder."


def tupe_relative_position_bucket(relative_position, num_buckets=32, max_distance=128):
    """TUPE's (T5's) bucket function as its code writes it (bidirectional)."""
    ret = 0
    n = -relative_position
    num_buckets //= 2
    ret += (n < 0).to(torch.long) * num_buckets
    n = torch.abs(n)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        torch.log(n.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    val_if_large = torch.min(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
    return ret + torch.where(is_small, n, val_if_large)


def tupe_rp_bucket(max_seq_len, bins):
    ctx = torch.arange(max_seq_len)[:, None]
    mem = torch.arange(max_seq_len)[None, :]
    bucket = tupe_relative_position_bucket(mem - ctx, num_buckets=bins, max_distance=128)
    bucket[:, 0] = bins  # others to [CLS]
    bucket[0, :] = bins // 2  # [CLS] to others
    return bucket


def fairseq_state_dict(rel=True, seed=0, dtype=torch.float64, layout="official"):
    """A TUPE ``BertModel`` state dict: ``layout="official"`` as guolinke/TUPE's merged code names it, ``"pr20"`` as
    its unmerged pull request #20 does (same values: ``pos_proj`` is ``[pos_q_linear; pos_k_linear]``)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.3):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    sd = {
        P + "embed_tokens.weight": r(V, D),
        P + "pos.weight": r(MAX_LEN + 1, D),
        P + "pos_q_linear.weight": r(D, D),
        P + "pos_q_linear.bias": r(D),
        P + "pos_k_linear.weight": r(D, D),
        P + "pos_k_linear.bias": r(D),
        P + "pos_ln.weight": 1 + r(D, std=0.1),
        P + "pos_ln.bias": r(D, std=0.1),
        P + "emb_layer_norm.weight": 1 + r(D, std=0.1),
        P + "emb_layer_norm.bias": r(D, std=0.1),
    }
    if rel:
        sd[P + "relative_attention_bias.weight"] = r(BINS + 1, H, std=1.0)
    if layout == "pr20":
        q_w, q_b, k_w, k_b = (
            sd.pop(P + k)
            for k in (
                "pos_q_linear.weight",
                "pos_q_linear.bias",
                "pos_k_linear.weight",
                "pos_k_linear.bias",
            )
        )
        sd[P + "pos_proj.weight"], sd[P + "pos_proj.bias"] = (
            torch.cat([q_w, k_w]),
            torch.cat([q_b, k_b]),
        )
        if rel:
            sd[P + "rp_bucket"] = tupe_rp_bucket(MAX_LEN, BINS)
    else:
        assert layout == "official"
    for i in range(L):
        q = f"{P}layers.{i}."
        sd |= {
            q + "self_attn.in_proj_weight": r(3 * D, D),
            q + "self_attn.in_proj_bias": r(3 * D, std=0.1),
            q + "self_attn.out_proj.weight": r(D, D),
            q + "self_attn.out_proj.bias": r(D, std=0.1),
            q + "self_attn_layer_norm.weight": 1 + r(D, std=0.1),
            q + "self_attn_layer_norm.bias": r(D, std=0.1),
            q + "fc1.weight": r(FFN, D),
            q + "fc1.bias": r(FFN, std=0.1),
            q + "fc2.weight": r(D, FFN),
            q + "fc2.bias": r(D, std=0.1),
            q + "final_layer_norm.weight": 1 + r(D, std=0.1),
            q + "final_layer_norm.bias": r(D, std=0.1),
        }
    sd |= {
        "decoder.lm_head.dense.weight": r(D, D),
        "decoder.lm_head.dense.bias": r(D, std=0.1),
        "decoder.lm_head.layer_norm.weight": 1 + r(D, std=0.1),
        "decoder.lm_head.layer_norm.bias": r(D, std=0.1),
        "decoder.lm_head.weight": sd[P + "embed_tokens.weight"],
        "decoder.lm_head.bias": r(V, std=0.1),
    }
    return sd


def fairseq_forward(sd, tokens):
    """TUPE's BertModel forward (eval) in float64: features [B, T, C] and LM logits [B, T, V]."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    ln = lambda x, name: F.layer_norm(x, (D,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)  # noqa: E731
    padding_mask = tokens.eq(PAD)
    x = ln(F.embedding(tokens, sd[P + "embed_tokens.weight"]), P + "emb_layer_norm")
    x = x * (1 - padding_mask.unsqueeze(-1).double())
    x = x.transpose(0, 1)  # T x B x C
    seq_len, bsz = x.shape[0], x.shape[1]
    weight = ln(sd[P + "pos.weight"][: seq_len + 1], P + "pos_ln")
    pos_scaling = float(D / H * 2) ** -0.5
    if P + "pos_q_linear.weight" in sd:  # TUPE's merged code
        pos_q = (
            F.linear(weight, sd[P + "pos_q_linear.weight"], sd[P + "pos_q_linear.bias"])
            .view(seq_len + 1, H, -1)
            .transpose(0, 1)
            * pos_scaling
        )
        pos_k = (
            F.linear(weight, sd[P + "pos_k_linear.weight"], sd[P + "pos_k_linear.bias"])
            .view(seq_len + 1, H, -1)
            .transpose(0, 1)
        )
    else:  # pull request #20
        pos_q, pos_k = (
            F.linear(weight, sd[P + "pos_proj.weight"], sd[P + "pos_proj.bias"])
            .reshape(seq_len + 1, 2, H, -1)
            .permute(1, 2, 0, 3)
        )
        pos_q = pos_q * pos_scaling
    abs_pos_bias = torch.bmm(pos_q, pos_k.transpose(1, 2))
    cls_2_other, other_2_cls = abs_pos_bias[:, 0, 0], abs_pos_bias[:, 1, 1]
    abs_pos_bias = abs_pos_bias[:, 1:, 1:].clone()
    abs_pos_bias[:, :, 0] = other_2_cls.view(-1, 1)
    abs_pos_bias[:, 0, :] = cls_2_other.view(-1, 1)
    if P + "relative_attention_bias.weight" in sd:
        rp = sd.get(P + "rp_bucket", tupe_rp_bucket(MAX_LEN, BINS))[
            :seq_len, :seq_len
        ]  # TUPE: in code
        abs_pos_bias = abs_pos_bias + F.embedding(
            rp, sd[P + "relative_attention_bias.weight"]
        ).permute(2, 0, 1)
    head_dim = D // H
    for i in range(L):
        q_ = f"{P}layers.{i}."
        residual = x
        q, k, v = F.linear(
            x, sd[q_ + "self_attn.in_proj_weight"], sd[q_ + "self_attn.in_proj_bias"]
        ).chunk(3, -1)
        q = q * float(head_dim * 2) ** -0.5
        q = q.contiguous().view(seq_len, bsz * H, head_dim).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * H, head_dim).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * H, head_dim).transpose(0, 1)
        w = torch.bmm(q, k.transpose(1, 2)).view(bsz, H, seq_len, seq_len) + abs_pos_bias
        w = w.masked_fill(padding_mask[:, None, None, :], float("-inf")).view(
            bsz * H, seq_len, seq_len
        )
        a = torch.bmm(F.softmax(w, dim=-1), v).transpose(0, 1).contiguous().view(seq_len, bsz, D)
        x = residual + F.linear(
            a, sd[q_ + "self_attn.out_proj.weight"], sd[q_ + "self_attn.out_proj.bias"]
        )
        x = ln(x, q_ + "self_attn_layer_norm")
        residual = x
        x = F.linear(
            F.gelu(F.linear(x, sd[q_ + "fc1.weight"], sd[q_ + "fc1.bias"])),
            sd[q_ + "fc2.weight"],
            sd[q_ + "fc2.bias"],
        )
        x = ln(residual + x, q_ + "final_layer_norm")
    features = x.transpose(0, 1)
    h = "decoder.lm_head."
    y = ln(
        F.gelu(F.linear(features, sd[h + "dense.weight"], sd[h + "dense.bias"])), h + "layer_norm"
    )
    return features, F.linear(y, sd[h + "weight"]) + sd[h + "bias"]


def tokens_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (3, 13), generator=g)
    ids[:, 0] = 0  # <s>, fairseq's [CLS]
    ids[1, 9:] = PAD
    ids[2, 4:] = PAD
    return ids


def test_fake_state_dict_has_tupes_key_names():
    sd = fairseq_state_dict()
    assert P + "pos_proj.weight" not in sd and P + "rp_bucket" not in sd
    assert sd[P + "pos_q_linear.weight"].shape == sd[P + "pos_k_linear.weight"].shape == (D, D)
    assert sd[P + "relative_attention_bias.weight"].shape == (BINS + 1, H)
    assert sd[P + "pos.weight"].shape == (MAX_LEN + 1, D)


@pytest.mark.parametrize("layout", ["official", "pr20"])
@pytest.mark.parametrize("rel", [True, False], ids=["tupe-r", "tupe-a"])
def test_converted_model_equals_fairseq_forward_float64(rel, layout):
    sd = fairseq_state_dict(rel=rel, layout=layout)
    model = from_tupe_fairseq(sd, num_attention_heads=None if rel else H, backend="eager")
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float64
    cfg = model.config
    assert cfg.position_mode == ("tupe-r" if rel else "tupe-a") and cfg.type_vocab_size == 0
    assert cfg.layer_norm_eps == cfg.position_layer_norm_eps == 1e-5
    assert (
        cfg.max_position_embeddings == MAX_LEN
        and model.bert.embeddings.token_type_embeddings is None
    )
    ids = tokens_batch()
    real = ids != PAD
    want_h, want_logits = fairseq_forward(sd, ids)
    with torch.no_grad():
        out = model(ids, attention_mask=real, output_hidden_states=True)
    assert_close(out.hidden_states[-1][real], want_h[real], rtol=1e-10, what="features")
    assert_close(out.logits[real], want_logits[real], rtol=1e-10, what="LM logits")


def test_converted_model_float32_fused_backend():
    sd = fairseq_state_dict(dtype=torch.float32)
    model = from_tupe_fairseq(sd)  # float32, default backend
    ids = tokens_batch(seed=2)
    real = ids != PAD
    _, want = fairseq_forward(sd, ids)
    with torch.no_grad():
        got = model(ids, attention_mask=real).logits
    assert_close(got[real].double(), want[real], rtol=FP32_RTOL * 4, what="float32 LM logits")


def test_cls_scalars_and_rows_shifted():
    """The positions are the checkpoint's rows 1.. and the [CLS] scalars are p0.p0*s + rel[16], p1.p1*s + rel[32]."""
    sd = fairseq_state_dict()
    cfg = config_from_tupe_fairseq(sd)
    out = tupe_fairseq_state_dict_to_effbert(sd, cfg)
    pe = "bert.position_encoder."
    assert torch.equal(out[pe + "position_embeddings.weight"], sd[P + "pos.weight"][1:])
    assert torch.equal(out[pe + "rel_table"], sd[P + "relative_attention_bias.weight"][:BINS])
    w = F.layer_norm(
        sd[P + "pos.weight"][:2].double(),
        (D,),
        sd[P + "pos_ln.weight"].double(),
        sd[P + "pos_ln.bias"].double(),
        1e-5,
    )
    q = F.linear(
        w, sd[P + "pos_q_linear.weight"].double(), sd[P + "pos_q_linear.bias"].double()
    ).view(2, H, D // H)
    k = F.linear(
        w, sd[P + "pos_k_linear.weight"].double(), sd[P + "pos_k_linear.bias"].double()
    ).view(2, H, D // H)
    s = (2 * D // H) ** -0.5
    rel = sd[P + "relative_attention_bias.weight"].double()
    assert_close(
        out[pe + "cls_row"].double(), (q[0] * k[0]).sum(-1) * s + rel[16], rtol=1e-6, what="cls_row"
    )
    assert_close(
        out[pe + "cls_col"].double(), (q[1] * k[1]).sum(-1) * s + rel[32], rtol=1e-6, what="cls_col"
    )
    assert torch.equal(out[pe + "query.weight"], sd[P + "pos_q_linear.weight"])
    assert torch.equal(out[pe + "key.bias"], sd[P + "pos_k_linear.bias"])
    pr20 = tupe_fairseq_state_dict_to_effbert(fairseq_state_dict(layout="pr20"), cfg)
    assert pr20.keys() == out.keys() and all(torch.equal(pr20[k], out[k]) for k in out)


class AverageMeter:
    """Stand-ins for fairseq.meters' classes, saved under that module name as fairseq's Trainer saves its meters."""

    def __init__(self):
        self.val, self.avg, self.sum, self.count = 0.5, 0.25, 3.0, 12


class TimeMeter:
    def __init__(self):
        self.init, self.start, self.n = 0, 1.6e9, 7


class StopwatchMeter:
    def __init__(self):
        self.sum, self.n, self.start_time = 2.5, 3, None


def save_as_fairseq_train_py(obj, path, **kwargs):
    """``torch.save`` with the meter stand-ins pickled as ``fairseq.meters.*``: the fake fairseq modules exist only
    while saving, so loading cannot import them."""
    fairseq, meters = types.ModuleType("fairseq"), types.ModuleType("fairseq.meters")
    fairseq.meters = meters
    classes = (AverageMeter, TimeMeter, StopwatchMeter)
    saved = [(c, c.__module__) for c in classes]
    try:
        sys.modules["fairseq"], sys.modules["fairseq.meters"] = fairseq, meters
        for c in classes:
            c.__module__ = "fairseq.meters"
            setattr(meters, c.__name__, c)
        torch.save(obj, path, **kwargs)
    finally:
        for c, module in saved:
            c.__module__ = module
        del sys.modules["fairseq"], sys.modules["fairseq.meters"]


def train_py_checkpoint(sd, args):
    """What fairseq's checkpoint_utils.save_state writes (guolinke/TUPE's fairseq), with an OrderedDict model."""
    model = collections.OrderedDict(sd)
    model._metadata = collections.OrderedDict({"": {"version": 1}})
    meters = collections.OrderedDict(
        train_loss=AverageMeter(), wps=TimeMeter(), train_wall=StopwatchMeter()
    )
    return {
        "args": args,
        "model": model,
        "optimizer_history": [
            {
                "criterion_name": "MaskedLmLoss",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": 2.5},
                "num_updates": 1000,
            }
        ],
        "extra_state": {
            "train_iterator": {"epoch": 2, "iterations_in_epoch": 10, "shuffle": True},
            "val_loss": 2.5,
            "best": 2.5,
            "train_meters": meters,
        },
        "last_optimizer_state": {
            "state": {0: {"step": 1000, "exp_avg": torch.zeros(4)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.98), "params": [0]}],
        },
    }


@pytest.mark.parametrize(
    "zipfile", [True, False], ids=["zip", "legacy"]
)  # torch < 1.6 wrote the legacy format
@pytest.mark.parametrize("rel", [True, False], ids=["tupe-r", "tupe-a"])
def test_train_py_checkpoint_file(tmp_path, rel, zipfile):
    sd = fairseq_state_dict(rel=rel)
    args = argparse.Namespace(
        encoder_attention_heads=H,
        activation_fn="gelu",
        dropout=0.1,
        attention_dropout=0.1,
        rel_pos=rel,
        max_positions=MAX_LEN,
        embedding_normalize=True,
        arch="bert_base",
    )
    path = tmp_path / "checkpoint_best.pt"
    save_as_fairseq_train_py(
        train_py_checkpoint(sd, args), path, _use_new_zipfile_serialization=zipfile
    )
    assert "fairseq" not in sys.modules
    with pytest.raises(
        Exception, match="fairseq.meters"
    ):  # what the old reader (torch's weights-only) refused
        with torch.serialization.safe_globals([argparse.Namespace]):
            torch.load(path, weights_only=True)
    model = from_tupe_fairseq(path, backend="eager")
    assert (
        "fairseq" not in sys.modules and "fairseq.meters" not in sys.modules
    )  # nothing was imported
    assert model.config.num_attention_heads == H
    assert model.config.position_mode == ("tupe-r" if rel else "tupe-a")
    ids = tokens_batch()
    real = ids != PAD
    want_h, want = fairseq_forward(sd, ids)
    with torch.no_grad():
        out = model(ids, attention_mask=real, output_hidden_states=True)
    assert_close(out.hidden_states[-1][real], want_h[real], rtol=1e-10, what="features")
    assert_close(out.logits[real], want[real], rtol=1e-10, what="LM logits")


def test_checkpoint_meters_load_inert(tmp_path):
    from effbert.integrations.tupe_fairseq import load_fairseq_checkpoint

    path = tmp_path / "checkpoint_last.pt"
    save_as_fairseq_train_py(
        train_py_checkpoint(fairseq_state_dict(), argparse.Namespace(rel_pos=True)), path
    )
    ckpt = load_fairseq_checkpoint(path)
    meter = ckpt["extra_state"]["train_meters"]["train_loss"]
    assert type(meter).__module__ == "fairseq.meters" and type(meter).__name__ == "AverageMeter"
    assert not isinstance(meter, AverageMeter) and meter.pickled_state["count"] == 12
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].rel_pos is True
    assert torch.equal(ckpt["model"][P + "pos.weight"], fairseq_state_dict()[P + "pos.weight"])


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CallsEval:
    def __reduce__(self):
        return eval, ("__import__('sys').modules.__setitem__('effbert_test_pwned', 1)",)


@pytest.mark.parametrize("where", ["extra_state", "model", "args"])
def test_pickle_that_runs_code_is_refused(tmp_path, where):
    marker = tmp_path / "pwned"
    ckpt = train_py_checkpoint(fairseq_state_dict(), argparse.Namespace(encoder_attention_heads=H))
    if where == "extra_state":
        ckpt["extra_state"]["hook"] = RunsShell(marker)
    elif where == "model":
        ckpt["model"]["decoder.evil"] = RunsShell(marker)
    else:
        ckpt["args"].evil = RunsShell(marker)
    path = tmp_path / "checkpoint_best.pt"
    save_as_fairseq_train_py(ckpt, path)
    with pytest.raises(
        ValueError, match=r"refusing the TUPE checkpoint .*(posix|nt)\.system.*nothing was executed"
    ):
        from_tupe_fairseq(path)
    assert not marker.exists()
    torch.save({"model": fairseq_state_dict(), "x": CallsEval()}, path)
    with pytest.raises(ValueError, match=r"builtins\.eval"):
        from_tupe_fairseq(path)
    assert "effbert_test_pwned" not in sys.modules


def test_neither_position_layout_names_the_missing_keys():
    sd = {
        k: v
        for k, v in fairseq_state_dict().items()
        if "pos_q_linear" not in k and "pos_k_linear" not in k
    }
    with pytest.raises(
        ValueError, match=r"pos_q_linear\.weight.*pos_k_linear\.bias.*pos_proj\.weight"
    ) as info:
        from_tupe_fairseq(sd)
    assert P + "pos_q_linear.weight" in str(info.value)
    partial = fairseq_state_dict() | {}
    del partial[P + "pos_k_linear.bias"]
    with pytest.raises(
        ValueError, match=r"missing \['decoder\.sentence_encoder\.pos_k_linear\.bias'\]"
    ):
        from_tupe_fairseq(partial)
    short = fairseq_state_dict()
    del short[P + "layers.1.fc2.bias"], short[P + "pos_ln.bias"]
    with pytest.raises(ValueError, match=r"pos_ln\.bias"):
        from_tupe_fairseq(short)
    del short[P + "pos.weight"]
    short[P + "pos_ln.bias"] = torch.zeros(D)
    with pytest.raises(ValueError, match=r"pos\.weight"):
        from_tupe_fairseq(short)
    short[P + "pos.weight"] = torch.zeros(MAX_LEN + 1, D)
    with pytest.raises(ValueError, match=r"layers\.1\.fc2\.bias"):
        from_tupe_fairseq(short)
    bad = fairseq_state_dict()
    bad[P + "pos_q_linear.weight"] = torch.zeros(D, 2 * D)
    with pytest.raises(ValueError, match=r"pos_q_linear\.weight must be \[32, 32\]"):
        from_tupe_fairseq(bad)


def test_bad_checkpoints(tmp_path):
    sd = fairseq_state_dict()
    with pytest.raises(ValueError, match="num_attention_heads must be given"):
        from_tupe_fairseq(fairseq_state_dict(rel=False))
    with pytest.raises(ValueError, match="pre-LN"):
        from_tupe_fairseq(sd | {P + "emb_out_layer_norm.weight": torch.ones(D)})
    with pytest.raises(ValueError, match="emb_layer_norm"):
        from_tupe_fairseq({k: v for k, v in sd.items() if "emb_layer_norm" not in k})
    with pytest.raises(ValueError, match="rp_bucket disagrees"):
        from_tupe_fairseq(sd | {P + "rp_bucket": tupe_rp_bucket(MAX_LEN, BINS).flip(1)})
    with pytest.raises(ValueError, match="not tied"):
        from_tupe_fairseq(sd | {"decoder.lm_head.weight": torch.zeros(V, D)})
    with pytest.raises(ValueError, match="one TUPE fairseq encoder"):
        from_tupe_fairseq({"encoder.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="checkpoint must be"):
        from_tupe_fairseq(3)
    bad = tmp_path / "cut.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cut.pt"):
        from_tupe_fairseq(bad)
