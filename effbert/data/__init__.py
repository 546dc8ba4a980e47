"""The data side of pretraining and fine-tuning: tokenization, the corpus, TNF's rare-word span finding and the
collators that turn text into model batches. It sits beside the library (ops, nn, models), below the commands."""
