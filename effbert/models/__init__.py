"""The reference model family: a post-LN BERT encoder on effbert's TUPE ops, with MLM and classification heads."""

from .config import POSITION_MODES, TupeBertConfig
from .tupe_bert import (
    MaskedLMOutput,
    SequenceClassifierOutput,
    TupeBertForMaskedLM,
    TupeBertForSequenceClassification,
    TupeBertModel,
    TupeBertOutput,
)

__all__ = ["POSITION_MODES", "TupeBertConfig", "TupeBertModel", "TupeBertForMaskedLM",
           "TupeBertForSequenceClassification", "TupeBertOutput", "MaskedLMOutput", "SequenceClassifierOutput"]
