"""The reference model family: a post-LN BERT encoder on effbert's TUPE ops, with MLM, MC-BERT and classification heads."""

from .config import POSITION_MODES, TupeBertConfig
from .mc_bert import MultiChoicePretrainingOutput, TupeBertForMultiChoicePretraining, controller_config
from .tupe_bert import (
    MaskedLMOutput,
    SequenceClassifierOutput,
    TupeBertForMaskedLM,
    TupeBertForSequenceClassification,
    TupeBertModel,
    TupeBertOutput,
)

__all__ = ["POSITION_MODES", "TupeBertConfig", "TupeBertModel", "TupeBertForMaskedLM",
           "TupeBertForSequenceClassification", "TupeBertForMultiChoicePretraining",
           "MultiChoicePretrainingOutput", "controller_config", "TupeBertOutput", "MaskedLMOutput", "SequenceClassifierOutput"]
