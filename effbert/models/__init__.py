"""The reference model family: a post-LN BERT encoder on effbert's TUPE ops, with MLM, MC-BERT and classification
heads, as ``transformers`` models (model type ``"tupe-bert"``)."""

from .config import POSITION_MODES, TupeBertConfig
from .mc_bert import (
    MultiChoicePretrainingOutput,
    TupeBertForMultiChoicePretraining,
    controller_config,
)
from .tupe_bert import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    MultiExitSequenceClassifierOutput,
    SequenceClassifierOutput,
    TupeBertForMaskedLM,
    TupeBertForSequenceClassification,
    TupeBertModel,
    TupeBertPreTrainedModel,
)
from .loading import load_pretrained
from .quantization import QUANTIZED_DTYPES, quantize_for_cpu
from .token_classification import (
    TOKEN_EXIT_MODES,
    MultiExitTokenClassifierOutput,
    SelfSamplingDraw,
    TokenClassifierOutput,
    TokenExitOutput,
    TupeBertForTokenClassification,
    multi_exit_token_loss,
    published_token_thresholds,
    draw_self_sampling,
    self_sampling_token_exit_layers,
    self_sampling_token_loss,
    simulate_word_exits,
)

__all__ = [
    "POSITION_MODES",
    "TupeBertConfig",
    "TupeBertPreTrainedModel",
    "TupeBertModel",
    "TupeBertForMaskedLM",
    "TupeBertForSequenceClassification",
    "TupeBertForMultiChoicePretraining",
    "MultiChoicePretrainingOutput",
    "controller_config",
    "BaseModelOutputWithPooling",
    "MaskedLMOutput",
    "SequenceClassifierOutput",
    "MultiExitSequenceClassifierOutput",
    "TupeBertForTokenClassification",
    "MultiExitTokenClassifierOutput",
    "TokenClassifierOutput",
    "TokenExitOutput",
    "TOKEN_EXIT_MODES",
    "multi_exit_token_loss",
    "published_token_thresholds",
    "register_auto_classes",
    "quantize_for_cpu",
    "QUANTIZED_DTYPES",
    "load_pretrained",
    "SelfSamplingDraw",
    "draw_self_sampling",
    "simulate_word_exits",
    "self_sampling_token_exit_layers",
    "self_sampling_token_loss",
]


def register_auto_classes():
    """Registers ``TupeBertConfig`` and the models with transformers' ``Auto*`` classes (idempotent; ``import
    effbert`` calls it)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if TupeBertConfig.model_type in CONFIG_MAPPING:
        return
    AutoConfig.register(TupeBertConfig.model_type, TupeBertConfig)
    AutoModel.register(TupeBertConfig, TupeBertModel)
    AutoModelForMaskedLM.register(TupeBertConfig, TupeBertForMaskedLM)
    AutoModelForSequenceClassification.register(TupeBertConfig, TupeBertForSequenceClassification)
    AutoModelForTokenClassification.register(TupeBertConfig, TupeBertForTokenClassification)
