"""Bridges to other libraries (optional dependencies, imported only when used): ``hf``
(transformers BERTs: ``from_hf_bert``, ``patch_bert_attention``, ``multi_exit_bert``), ``sentence``
(sentence embeddings on ``from_hf_bert``: ``SentenceEncoder``, ``EffbertTransformer`` for
sentence-transformers), ``tupe_fairseq``."""
