"""The BERT-family encoder built from roberta_fast.ops and torch GEMMs: RoBERTa, BERT (XLM-R, CamemBERT
and MiniLM load through them) and their MLM / sequence / token / question-answering heads.

    config.py      EncoderConfig
    outputs.py     ModelOutput and the output classes; pool (sentence embeddings)
    encoder.py     the modules, each with its forward, the whole-encoder forward, RobertaModel / BertModel
                   (its docstring walks through one layer)
    checks.py      input checks and the one host sync per forward
    checkpoint.py  checkpoint files and names, from_pretrained's arguments
    pretrained.py  PreTrainedEncoder: from_pretrained / save_pretrained, embeddings and their resizing,
                   gradient checkpointing, device / dtype / num_parameters
    heads.py       MaskedLM, SequenceClassification, TokenClassification, QuestionAnswering and their losses

Packing of padded batches lives in roberta_fast.padding.

Autocast (float32 weights, torch.autocast fp16 / bf16) follows transformers' semantics: the GEMMs run in the
autocast dtype and the residual stream stays float32. Every fused op gets the GEMM output in the autocast
dtype with the float32 weights; layer_norm adds the float32 residual and returns float32 (ops.layer_norm's
out_dtype=float32); attention runs with autocast off (the torch backend accumulates
in float32 too). The embedding LayerNorm reads rows of the float32 tables. As in transformers,
last_hidden_state, hidden_states and attentions come out float32 and the pooler output and the heads'
logits in the autocast dtype.

Gradient checkpointing: every encoder Layer carries transformers' `gradient_checkpointing` flag and
`_gradient_checkpointing_func`, set by gradient_checkpointing_enable() (ours, or transformers' own on a model
after roberta_fast.optimize); in training with grad enabled a flagged layer is recomputed in the backward.
"""

from .checkpoint import _normalize_keys, _read_state_dict, _shards  # noqa: F401
from .checks import HostChecks, check_extra_kwargs  # noqa: F401
from .config import ACTIVATIONS, BERT_TYPES, MODEL_TYPES, ROBERTA_TYPES, EncoderConfig, as_config  # noqa: F401
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
from .pretrained import PreTrainedEncoder, count_params  # noqa: F401

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
