"""effbert.nn.Linear: CPU inference on pre-packed oneDNN weights, against F.linear and float64."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effbert
from effbert.models import TupeBertConfig, TupeBertModel, quantize_for_cpu
from effbert.nn import Linear
from effbert.nn.linear import packed_linear_available
from effbert.reference.compare import assert_close, relative_error

needs_packed = pytest.mark.skipif(
    not packed_linear_available(), reason="this torch has no oneDNN packed linear"
)
needs_bf16 = pytest.mark.skipif(
    not packed_linear_available(torch.bfloat16), reason="no oneDNN bf16 linear on this CPU"
)


def _linear(k, n, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = Linear(k, n, bias=bias).eval()
    with torch.no_grad():  # BERT-sized values: weights ~ N(0, 0.02) would hide a wrong bias
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.5)
    return lin


def _ref64(lin, x):
    b = None if lin.bias is None else lin.bias.double()
    return F.linear(x.double(), lin.weight.double(), b)


def _ran_packed(lin):
    return lin._packed is not None


@needs_packed
@pytest.mark.parametrize("k,n,m", [(768, 256, 31), (3072, 96, 7), (97, 129, 1)])
def test_fp32_packed_within_addmm_error_of_float64(k, n, m):
    lin = _linear(k, n)
    x = torch.randn(m, k)
    with torch.no_grad():
        out = lin(x)
    assert _ran_packed(lin) and out.dtype == torch.float32 and out.shape == (m, n)
    ref = _ref64(lin, x)
    addmm = F.linear(x, lin.weight, lin.bias)
    # the packed GEMM is as close to float64 as addmm (the fp32 rule: 1e-5 relative) ...
    assert_close(out, ref, rtol=1e-5)
    assert relative_error(out, ref) <= 2 * relative_error(addmm, ref) + 1e-7
    # ... and the same numbers up to summation order
    assert_close(out, addmm.double(), rtol=1e-5)


@needs_packed
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_gelu_equals_gelu_of_linear(approximate):
    lin = _linear(768, 384)
    x = torch.randn(2, 17, 768)
    with torch.no_grad():
        out = lin.forward_gelu(x, approximate)
    assert _ran_packed(lin) and out.shape == (2, 17, 384)
    ref = F.gelu(_ref64(lin, x), approximate=approximate)
    assert_close(out, ref, rtol=1e-5)
    eager = F.gelu(F.linear(x, lin.weight, lin.bias), approximate=approximate)
    assert relative_error(out, ref) <= 2 * relative_error(eager, ref) + 1e-7
    with pytest.raises(ValueError, match="approximate"):
        lin.forward_gelu(x, "erf")


@needs_bf16
def test_bf16_packed_within_bf16_rounding():
    lin = _linear(768, 512).to(torch.bfloat16)
    x = torch.randn(31, 768).to(torch.bfloat16)
    with torch.inference_mode():
        out = lin(x)
        gelu = lin.forward_gelu(x)
    assert _ran_packed(lin) and out.dtype == torch.bfloat16
    ref = _ref64(lin, x)
    eager = F.linear(x, lin.weight, lin.bias)  # the same precision through addmm
    assert_close(out, ref, rtol=1e-5, lowp_eager=eager)
    assert_close(gelu, F.gelu(ref), rtol=1e-5, lowp_eager=F.gelu(eager.float()).bfloat16())


@needs_packed
def test_odd_shapes_and_layouts():
    lin = _linear(64, 48)
    nob = _linear(64, 48, bias=False)
    with torch.no_grad():
        for x in (
            torch.randn(1, 64),  # one row
            torch.randn(3, 5, 64),  # 3-D
            torch.randn(64, 9).t(),  # non-contiguous rows
            torch.randn(9, 128)[:, ::2],  # strided columns
            torch.randn(64),  # 1-D, as nn.Linear takes it
        ):
            for m in (lin, nob):
                out = m(x)
                assert out.shape == x.shape[:-1] + (48,)
                assert_close(out, _ref64(m, x), rtol=1e-5)
                assert_close(m.forward_gelu(x), F.gelu(_ref64(m, x)), rtol=1e-5, what="gelu output")
        for x in (torch.randn(0, 64), torch.randn(2, 0, 64)):  # no rows: F.linear's empty output
            assert lin(x).shape == x.shape[:-1] + (48,)
            assert lin.forward_gelu(x).shape == x.shape[:-1] + (48,)
    assert nob.bias is None and _ran_packed(nob)


@needs_packed
def test_cache_follows_every_weight_change():
    lin = _linear(32, 16)
    x = torch.randn(5, 32)

    def check():
        with torch.no_grad():
            out = lin(x)
        assert _ran_packed(lin)
        assert_close(out, _ref64(lin, x), rtol=1e-5)

    check()
    first = lin.packed_weight()
    with torch.no_grad():
        lin(x)
    assert lin.packed_weight() is first  # reused while the weight is unchanged
    # a training step between two inference calls
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin.train()
    lin(torch.randn(4, 32)).square().sum().backward()
    opt.step()
    lin.eval()
    check()
    # load_state_dict copies into the same tensors (a new version, the same storage)
    lin.load_state_dict({"weight": torch.randn(16, 32), "bias": torch.randn(16)})
    check()
    # an in-place edit under no_grad
    with torch.no_grad():
        lin.weight.mul_(-2)
    check()
    # a new Parameter
    lin.weight = nn.Parameter(torch.randn(16, 32))
    check()
    # dtype and device moves
    lin.double().float()
    check()
    # .data bypasses the version counter: clear_cache is the documented step
    lin.weight.data = torch.randn(16, 32)
    check()  # a new storage: seen through data_ptr
    lin.weight.data.copy_(torch.randn(16, 32))
    lin.clear_cache()
    check()


@needs_packed
def test_cache_never_reaches_state_dict_copies_or_pickles(tmp_path):
    lin = _linear(32, 16)
    with torch.no_grad():
        lin(torch.randn(3, 32))
    assert _ran_packed(lin)
    assert list(lin.state_dict()) == ["weight", "bias"]
    assert list(dict(lin.named_buffers())) == []
    for other in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert other._packed is None and torch.equal(other.weight, lin.weight)
    buf = io.BytesIO()
    torch.save(lin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded._packed is None
    torch.manual_seed(0)
    model = TupeBertModel(_config()).eval()
    with torch.no_grad():
        model(torch.randint(1, 50, (1, 6)))
    model.save_pretrained(tmp_path)
    again = TupeBertModel.from_pretrained(tmp_path)
    assert set(again.state_dict()) == set(model.state_dict())
    assert not any(".packed" in k or "_packed" in k for k in again.state_dict())


def test_grad_mode_runs_f_linear_with_unchanged_gradients():
    lin = _linear(48, 24)
    ref = nn.Linear(48, 24)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(6, 48, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out = lin.forward_gelu(x)
    F.gelu(ref(x2)).sum().backward()
    out.sum().backward()
    assert not _ran_packed(lin)  # autograd recorded: F.linear, nothing packed
    assert torch.equal(x.grad, x2.grad) and torch.equal(lin.weight.grad, ref.weight.grad)
    assert torch.equal(lin.bias.grad, ref.bias.grad)
    # no_grad with an input that needs grad: nothing is recorded, so the packed path is safe
    with torch.no_grad():
        lin(x)
    assert _ran_packed(lin) == packed_linear_available()


def test_bad_input_raises_as_nn_linear():
    lin, ref = _linear(16, 8), nn.Linear(16, 8)
    ref.load_state_dict(lin.state_dict())
    for x in (torch.randn(3, 15), torch.randn(3, 16, dtype=torch.float64), torch.randn(())):
        with pytest.raises(RuntimeError) as theirs, torch.no_grad():
            ref(x)
        with pytest.raises(RuntimeError) as ours, torch.no_grad():
            lin(x)
        assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)
    assert not _ran_packed(lin)
    with pytest.raises(ValueError, match="backend"):
        Linear(4, 4, backend="fast")
    with pytest.raises(TypeError, match="linear"):
        Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="dtype"):
        packed_linear_available("float32")


@needs_packed
def test_off_switches(monkeypatch):
    lin = _linear(32, 16)
    x = torch.randn(4, 32)
    with torch.no_grad():
        lin.backend = "eager"
        lin(x)
        assert not _ran_packed(lin)
        lin.backend = "auto"
        monkeypatch.setenv("EFFBERT_BACKEND", "eager")
        lin(x)
        assert not _ran_packed(lin)
        monkeypatch.delenv("EFFBERT_BACKEND")
        monkeypatch.setattr(Linear, "packed", False)  # the switch for every module
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        assert not _ran_packed(lin)
        monkeypatch.setattr(Linear, "packed", True)
        lin(x)
        assert _ran_packed(lin)
    # the model's backend: set_backend("eager") reaches every linear
    torch.manual_seed(0)
    model = TupeBertModel(_config()).eval()
    model.set_backend("eager")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.backend == "eager" for m in linears)
    with torch.no_grad():
        model(torch.randint(1, 50, (2, 7)))
    assert not any(_ran_packed(m) for m in linears)


@needs_packed
def test_compile_traces_f_linear():
    lin = _linear(32, 16)
    x = torch.randn(4, 32)
    compiled = torch.compile(lin, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
    assert not _ran_packed(lin)  # dynamo traced F.linear, not the cache
    assert_close(out, _ref64(lin, x), rtol=1e-5)


def test_from_linear_shares_parameters():
    base = nn.Linear(8, 4)
    lin = Linear.from_linear(base)
    assert isinstance(lin, nn.Linear) and lin.weight is base.weight and lin.bias is base.bias
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_close(lin(x), _ref64(lin, x), rtol=1e-5)


def _config(**kw):
    base = dict(
        vocab_size=50,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        position_mode="tupe-r",
    )
    return TupeBertConfig(**(base | kw))


def _unpacked(model, monkeypatch, *args, **kwargs):
    monkeypatch.setattr(Linear, "packed", False)
    try:
        return model(*args, **kwargs)
    finally:
        monkeypatch.setattr(Linear, "packed", True)


@needs_packed
def test_tupe_model_equals_unpacked_path(monkeypatch):
    torch.manual_seed(0)
    model = TupeBertModel(_config()).eval()
    ids = torch.randint(1, 50, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    with torch.inference_mode():
        out = model(ids, attention_mask=mask).last_hidden_state
        ref = _unpacked(model, monkeypatch, ids, attention_mask=mask).last_hidden_state
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(_ran_packed(m) for m in linears)  # QKV, out, FFN, positional, pooler
    assert relative_error(out, ref.double()) <= 1e-5


@needs_packed
def test_from_hf_bert_minilm_sized_equals_unpacked_path(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from effbert.integrations.hf import from_hf_bert

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=384,
        num_hidden_layers=2,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=64,
    )
    hf = transformers.BertModel(cfg).eval()
    model = from_hf_bert(hf)
    ids = torch.randint(1, 120, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        ref = _unpacked(model, monkeypatch, ids, attention_mask=mask).last_hidden_state
        theirs = hf(ids, attention_mask=mask).last_hidden_state
    assert model.encoder.layers[0].intermediate._packed is not None
    assert relative_error(out, ref.double()) <= 1e-5
    real = mask.bool()
    assert relative_error(out[real], theirs[real].double()) <= 1e-5


@needs_packed
def test_quantized_and_bf16_models_run_their_float_linears_packed():
    torch.manual_seed(0)
    model = TupeBertModel(_config()).eval()
    ids = torch.randint(1, 50, (2, 9))
    q = quantize_for_cpu(model)
    kept = q.encoder.layers[0].output
    assert type(kept) is Linear  # KEEP_FLOAT: the FFN down projection, still effbert's
    with torch.no_grad():
        q(ids)
        fp32 = model(ids).last_hidden_state
    assert kept._packed is not None and q.position_encoder.query._packed is not None
    every = quantize_for_cpu(model, keep_float=())
    assert not isinstance(every.encoder.layers[0].output, nn.Linear)  # quantised too
    if packed_linear_available(torch.bfloat16):
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        with torch.no_grad():
            out = bf16(ids).last_hidden_state
        assert bf16.encoder.layers[0].intermediate.packed_weight().dtype == torch.bfloat16
        cos = F.cosine_similarity(out.double(), fp32.double(), dim=-1)
        assert cos.min() > 0.999


def test_models_use_effbert_linear():
    model = TupeBertModel(_config())
    layer = model.encoder.layers[0]
    for m in (layer.attention.qkv, layer.attention.out, layer.intermediate, layer.output):
        assert type(m) is Linear and isinstance(m, nn.Linear)
    assert type(model.position_encoder.query) is Linear and type(model.pooler.dense) is Linear
    assert effbert.nn.Linear is Linear


@needs_bf16
def test_quantize_for_cpu_keeps_float_linears_in_bf16_on_request():
    from effbert.models import TupeBertForSequenceClassification
    from effbert.models.quantization import _CastLinear

    torch.manual_seed(0)
    model = TupeBertForSequenceClassification(_config(multi_exit=True, num_labels=3)).eval()
    ids = torch.randint(1, 50, (4, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_for_cpu(model, float_dtype=torch.bfloat16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    kept = q.bert.encoder.layers[0].output
    assert type(kept) is _CastLinear and kept.weight.dtype == torch.bfloat16
    assert q.bert.position_encoder.query.weight.dtype == torch.float32  # positional: fp32
    # the kept linear alone: fp32 in and out, within bf16 rounding of the fp32 layer in float64
    fp32_layer = model.bert.encoder.layers[0].output
    x = torch.randn(7, fp32_layer.in_features)
    with torch.no_grad():
        out = kept(x)
    assert out.dtype == torch.float32 and kept._packed is not None
    eager = F.linear(x.bfloat16(), fp32_layer.weight.bfloat16(), fp32_layer.bias.bfloat16())
    assert_close(out.bfloat16(), _ref64(fp32_layer, x), rtol=1e-5, lowp_eager=eager)
    # the whole model against the int8 one with fp32 kept layers; early exit runs on it
    q32 = quantize_for_cpu(model)
    with torch.no_grad():
        a = q(ids, attention_mask=mask).exit_logits
        b = q32(ids, attention_mask=mask).exit_logits
        logits, exit_layer = q.early_exit(ids, mask, criterion="entropy", threshold=0.5)
    assert relative_error(a, b.double()) < 2e-2
    assert logits.shape == (4, 3) and exit_layer.shape == (4,)
    assert ((exit_layer >= 1) & (exit_layer <= 2)).all()
    # qkv kept too: its fused GEMM runs cast (no fp32 weight rows to cut)
    q_qkv = quantize_for_cpu(model, keep_float=("qkv", "output"), float_dtype=torch.bfloat16)
    with torch.no_grad():
        c = q_qkv(ids, attention_mask=mask).exit_logits
    assert relative_error(c, b.double()) < 5e-2


def test_quantize_for_cpu_float_dtype_errors(monkeypatch):
    from effbert.models import quantization

    model = TupeBertModel(_config()).eval()
    with pytest.raises(TypeError, match="float_dtype"):
        quantize_for_cpu(model, float_dtype=torch.float16)
    monkeypatch.setattr(quantization, "packed_linear_available", lambda dtype: False)
    with pytest.raises(ValueError, match="float_dtype"):
        quantize_for_cpu(model, float_dtype=torch.bfloat16)


@needs_packed
def test_model_built_under_inference_mode_runs_and_sees_in_place_edits(monkeypatch):
    """Parameters made under ``torch.inference_mode()`` are inference tensors with no version counter:
    the packed path must neither crash on them nor cache a weight it cannot watch (an in-place edit inside
    inference mode shows at once), and the TUPE positional cache must not key on them either."""
    with torch.inference_mode():
        torch.manual_seed(0)
        model = TupeBertModel(_config()).eval()
        for module in model.modules():
            if hasattr(module, "cache") and isinstance(module.cache, bool):
                module.cache = True
        ids = torch.randint(1, 50, (2, 9))
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        out = model(ids, attention_mask=mask).last_hidden_state
        ref = _unpacked(model, monkeypatch, ids, attention_mask=mask).last_hidden_state
        assert relative_error(out, ref.double()) <= 1e-5
    x = torch.randn(5, 64)
    with torch.inference_mode():
        lin = Linear(64, 32).eval()
        first = lin(x)
        assert (
            relative_error(first, F.linear(x.double(), lin.weight.double(), lin.bias.double()))
            <= 1e-5
        )
        lin.weight.mul_(2.0)  # no version counter: a cache would return the old product
        second = lin(x)
        assert lin._packed is None
        assert (
            relative_error(second, F.linear(x.double(), lin.weight.double(), lin.bias.double()))
            <= 1e-5
        )
        assert relative_error(second, 2 * first.double() - lin.bias.double()) <= 1e-5


@needs_packed
def test_forward_rows_is_the_row_block_and_follows_weight_changes():
    """``forward_rows(x, a, b)`` equals ``F.linear`` on rows ``a:b`` of the weight and bias (float64
    reference, packed and in grad mode), each block's packing rebuilt after an optimizer step."""
    lin = _linear(96, 3 * 40)
    x = torch.randn(7, 96)
    for start, stop in ((0, 40), (40, 120), (0, 120), (119, 120)):
        ref = F.linear(x.double(), lin.weight.double()[start:stop], lin.bias.double()[start:stop])
        with torch.no_grad():
            out = lin.forward_rows(x, start, stop)
        assert _ran_packed(lin) and (start, stop) in lin._packed
        assert out.shape == (7, stop - start)
        assert relative_error(out, ref) <= 1e-5
        grad_out = lin.forward_rows(x, start, stop)  # grad mode: F.linear on the rows
        assert grad_out.requires_grad
        assert relative_error(grad_out, ref) <= 1e-5
    optimizer = torch.optim.SGD(lin.parameters(), lr=0.1)
    lin.forward_rows(x, 0, 40).sum().backward()
    optimizer.step()
    with torch.no_grad():
        out = lin.forward_rows(x, 0, 40)
    ref = F.linear(x.double(), lin.weight.double()[:40], lin.bias.double()[:40])
    assert relative_error(out, ref) <= 1e-5
    for bad in ((0, 0), (-1, 4), (5, 121), (2.0, 4), (4, 2)):
        with pytest.raises(ValueError, match="start, stop"):
            lin.forward_rows(x, *bad)
