"""The data side of pretraining and fine-tuning: tokenization, the corpus, TNF's rare-word span finding and the
collators that turn text into model batches. It sits beside the library (ops, nn, models), below the commands.

- ``tokenization``: ``train_wordpiece``, ``load_tokenizer``, ``save_tokenizer`` (``tokenizers``; a
  ``BertTokenizerFast`` for users);
- ``corpus``: ``load_corpus`` (``datasets``: text files to a cached, memory-mapped dataset of texts or sentence
  pairs), ``count_words`` / ``rare_words`` / ``rare_word_table`` (TNF's rare words, streamed);
- ``packing``: ``pack`` (several texts a row, ``position_ids`` restarting per text), ``pack_lengths``,
  ``text_lengths``;
- ``collator``: ``DataCollatorForTupeMLM`` (padding, BERT's masking, TNF spans);
- ``tnf``: ``RareWordTable``, ``build_rare_vocab``;
- ``conll``: ``read_conll``, ``check_bio``, ``label_list``, ``encode_conll``,
  ``token_classification_collator`` (sequence-labelling files, labels on first word pieces).

The submodules are imported on demand (``from effbert.data.corpus import load_corpus``): importing ``effbert`` does
not import ``datasets`` or ``tokenizers``. See docs/data.md."""
