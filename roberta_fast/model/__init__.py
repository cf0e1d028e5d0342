"""The BERT-family encoder built from roberta_fast.ops and torch GEMMs: RoBERTa, BERT (XLM-R, CamemBERT
and MiniLM load through them) and their MLM / sequence / token / question-answering heads.

    config.py      EncoderConfig
    outputs.py     ModelOutput and the output classes; pool (sentence embeddings)
    encoder.py     the modules, each with its forward, the whole-encoder forward, RobertaModel / BertModel
                   (its docstring walks through one layer)
    checks.py      input checks and the one host sync per forward
    checkpoint.py  from_pretrained / save_pretrained, checkpoint names, PreTrainedEncoder
    heads.py       MaskedLM, SequenceClassification, TokenClassification, QuestionAnswering and their losses

Packing of padded batches lives in roberta_fast.padding.
"""

from .checkpoint import PreTrainedEncoder, _normalize_keys, _read_state_dict, _shards  # noqa: F401
from .checks import HostChecks, check_extra_kwargs  # noqa: F401
from .config import ACTIVATIONS, BERT_TYPES, ROBERTA_TYPES, EncoderConfig, as_config  # noqa: F401
from .encoder import (  # noqa: F401
    Attention,
    BertModel,
    Embeddings,
    Encoder,
    Intermediate,
    Layer,
    Output,
    Pooler,
    RobertaModel,
    SelfAttention,
    SelfOutput,
    XLMRobertaModel,
    count_params,
    encoder_forward,
)
from .heads import (  # noqa: F401
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMPredictionHead,
    BertOnlyMLMHead,
    BertPredictionHeadTransform,
    RobertaClassificationHead,
    RobertaForMaskedLM,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaLMHead,
)
from .outputs import (  # noqa: F401
    EncoderOutput,
    MaskedLMOutput,
    ModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
    pool,
)

# the names these had when the model was one file (roberta_fast/model.py)
_check_extra_kwargs = check_extra_kwargs
_HostChecks = HostChecks
_as_config = as_config

__all__ = [
    "EncoderConfig", "RobertaModel", "XLMRobertaModel", "BertModel", "RobertaForMaskedLM",
    "RobertaForSequenceClassification", "RobertaForTokenClassification", "RobertaForQuestionAnswering",
    "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
    "BertForQuestionAnswering", "pool", "encoder_forward", "EncoderOutput",
]
