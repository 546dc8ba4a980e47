"""Official TUPE (fairseq) checkpoints: a state dict in fairseq's layout, converted, equals a float64
re-implementation of TUPE's own fairseq forward (guolinke/TUPE: transformer_sentence_encoder.py,
multihead_attention.py, transformer_sentence_encoder_layer.py, models/bert/model.py) on real tokens."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from effbert.integrations.tupe_fairseq import (config_from_tupe_fairseq, from_tupe_fairseq,
                                               tupe_fairseq_state_dict_to_effbert)

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
    val_if_large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                                * (num_buckets - max_exact)).to(torch.long)
    val_if_large = torch.min(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
    return ret + torch.where(is_small, n, val_if_large)


def tupe_rp_bucket(max_seq_len, bins):
    ctx = torch.arange(max_seq_len)[:, None]
    mem = torch.arange(max_seq_len)[None, :]
    bucket = tupe_relative_position_bucket(mem - ctx, num_buckets=bins, max_distance=128)
    bucket[:, 0] = bins  # others to [CLS]
    bucket[0, :] = bins // 2  # [CLS] to others
    return bucket


def fairseq_state_dict(rel=True, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.3):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    sd = {P + "embed_tokens.weight": r(V, D), P + "pos.weight": r(MAX_LEN + 1, D),
          P + "pos_proj.weight": r(2 * D, D), P + "pos_proj.bias": r(2 * D),
          P + "pos_ln.weight": 1 + r(D, std=0.1), P + "pos_ln.bias": r(D, std=0.1),
          P + "emb_layer_norm.weight": 1 + r(D, std=0.1), P + "emb_layer_norm.bias": r(D, std=0.1)}
    if rel:
        sd[P + "relative_attention_bias.weight"] = r(BINS + 1, H, std=1.0)
        sd[P + "rp_bucket"] = tupe_rp_bucket(MAX_LEN, BINS)
    for i in range(L):
        q = f"{P}layers.{i}."
        sd |= {q + "self_attn.in_proj_weight": r(3 * D, D), q + "self_attn.in_proj_bias": r(3 * D, std=0.1),
               q + "self_attn.out_proj.weight": r(D, D), q + "self_attn.out_proj.bias": r(D, std=0.1),
               q + "self_attn_layer_norm.weight": 1 + r(D, std=0.1), q + "self_attn_layer_norm.bias": r(D, std=0.1),
               q + "fc1.weight": r(FFN, D), q + "fc1.bias": r(FFN, std=0.1), q + "fc2.weight": r(D, FFN),
               q + "fc2.bias": r(D, std=0.1), q + "final_layer_norm.weight": 1 + r(D, std=0.1),
               q + "final_layer_norm.bias": r(D, std=0.1)}
    sd |= {"decoder.lm_head.dense.weight": r(D, D), "decoder.lm_head.dense.bias": r(D, std=0.1),
           "decoder.lm_head.layer_norm.weight": 1 + r(D, std=0.1), "decoder.lm_head.layer_norm.bias": r(D, std=0.1),
           "decoder.lm_head.weight": sd[P + "embed_tokens.weight"], "decoder.lm_head.bias": r(V, std=0.1)}
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
    pos_q, pos_k = F.linear(weight, sd[P + "pos_proj.weight"], sd[P + "pos_proj.bias"]).reshape(
        seq_len + 1, 2, H, -1).permute(1, 2, 0, 3)
    pos_q = pos_q * float(D / H * 2) ** -0.5
    abs_pos_bias = torch.bmm(pos_q, pos_k.transpose(1, 2))
    cls_2_other, other_2_cls = abs_pos_bias[:, 0, 0], abs_pos_bias[:, 1, 1]
    abs_pos_bias = abs_pos_bias[:, 1:, 1:].clone()
    abs_pos_bias[:, :, 0] = other_2_cls.view(-1, 1)
    abs_pos_bias[:, 0, :] = cls_2_other.view(-1, 1)
    if P + "relative_attention_bias.weight" in sd:
        rp = sd[P + "rp_bucket"][:seq_len, :seq_len]
        abs_pos_bias = abs_pos_bias + F.embedding(rp, sd[P + "relative_attention_bias.weight"]).permute(2, 0, 1)
    head_dim = D // H
    for i in range(L):
        q_ = f"{P}layers.{i}."
        residual = x
        q, k, v = F.linear(x, sd[q_ + "self_attn.in_proj_weight"], sd[q_ + "self_attn.in_proj_bias"]).chunk(3, -1)
        q = q * float(head_dim * 2) ** -0.5
        q = q.contiguous().view(seq_len, bsz * H, head_dim).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * H, head_dim).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * H, head_dim).transpose(0, 1)
        w = torch.bmm(q, k.transpose(1, 2)).view(bsz, H, seq_len, seq_len) + abs_pos_bias
        w = w.masked_fill(padding_mask[:, None, None, :], float("-inf")).view(bsz * H, seq_len, seq_len)
        a = torch.bmm(F.softmax(w, dim=-1), v).transpose(0, 1).contiguous().view(seq_len, bsz, D)
        x = residual + F.linear(a, sd[q_ + "self_attn.out_proj.weight"], sd[q_ + "self_attn.out_proj.bias"])
        x = ln(x, q_ + "self_attn_layer_norm")
        residual = x
        x = F.linear(F.gelu(F.linear(x, sd[q_ + "fc1.weight"], sd[q_ + "fc1.bias"])), sd[q_ + "fc2.weight"],
                     sd[q_ + "fc2.bias"])
        x = ln(residual + x, q_ + "final_layer_norm")
    features = x.transpose(0, 1)
    h = "decoder.lm_head."
    y = ln(F.gelu(F.linear(features, sd[h + "dense.weight"], sd[h + "dense.bias"])), h + "layer_norm")
    return features, F.linear(y, sd[h + "weight"]) + sd[h + "bias"]


def tokens_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (3, 13), generator=g)
    ids[:, 0] = 0  # <s>, fairseq's [CLS]
    ids[1, 9:] = PAD
    ids[2, 4:] = PAD
    return ids


@pytest.mark.parametrize("rel", [True, False], ids=["tupe-r", "tupe-a"])
def test_converted_model_equals_fairseq_forward_float64(rel):
    sd = fairseq_state_dict(rel=rel)
    model = from_tupe_fairseq(sd, num_attention_heads=None if rel else H, backend="eager")
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float64
    cfg = model.config
    assert cfg.position_mode == ("tupe-r" if rel else "tupe-a") and cfg.type_vocab_size == 0
    assert cfg.layer_norm_eps == cfg.position_layer_norm_eps == 1e-5
    assert cfg.max_position_embeddings == MAX_LEN and model.bert.embeddings.token_type_embeddings is None
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
    w = F.layer_norm(sd[P + "pos.weight"][:2].double(), (D,), sd[P + "pos_ln.weight"].double(),
                     sd[P + "pos_ln.bias"].double(), 1e-5)
    proj = F.linear(w, sd[P + "pos_proj.weight"].double(), sd[P + "pos_proj.bias"].double())
    q, k = proj[:, :D].view(2, H, D // H), proj[:, D:].view(2, H, D // H)
    s = (2 * D // H) ** -0.5
    rel = sd[P + "relative_attention_bias.weight"].double()
    assert_close(out[pe + "cls_row"].double(), (q[0] * k[0]).sum(-1) * s + rel[16], rtol=1e-6, what="cls_row")
    assert_close(out[pe + "cls_col"].double(), (q[1] * k[1]).sum(-1) * s + rel[32], rtol=1e-6, what="cls_col")


def test_checkpoint_file_with_args(tmp_path):
    sd = fairseq_state_dict(rel=False)
    args = argparse.Namespace(encoder_attention_heads=H, activation_fn="gelu", dropout=0.1, attention_dropout=0.1)
    path = tmp_path / "checkpoint_best.pt"
    torch.save({"model": sd, "args": args}, path)
    model = from_tupe_fairseq(path, backend="eager")
    assert model.config.num_attention_heads == H and model.config.position_mode == "tupe-a"
    ids = tokens_batch()
    real = ids != PAD
    _, want = fairseq_forward(sd, ids)
    with torch.no_grad():
        got = model(ids, attention_mask=real).logits
    assert_close(got[real], want[real], rtol=1e-10, what="LM logits")


def test_bad_checkpoints(tmp_path):
    sd = fairseq_state_dict()
    with pytest.raises(ValueError, match="num_attention_heads must be given"):
        from_tupe_fairseq(fairseq_state_dict(rel=False))
    with pytest.raises(ValueError, match="pre-LN"):
        from_tupe_fairseq(sd | {P + "emb_out_layer_norm.weight": torch.ones(D)})
    with pytest.raises(ValueError, match="emb_layer_norm"):
        from_tupe_fairseq({k: v for k, v in sd.items() if "emb_layer_norm" not in k})
    with pytest.raises(ValueError, match="rp_bucket disagrees"):
        from_tupe_fairseq(sd | {P + "rp_bucket": sd[P + "rp_bucket"].flip(1)})
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
