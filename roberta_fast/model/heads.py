"""The task heads on top of the encoder, with transformers' names and losses: masked LM, sequence
classification, token classification and extractive question answering, for RoBERTa and BERT.

Each head model holds the encoder under base_model_prefix ("roberta" / "bert") and a head module that
owns its forward; token-level outputs at padded positions are the head applied to the encoder's zeros.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import trusted as ops  # the model checks its inputs once per forward (docs/host_path.md)
from ..ops.linear_cross_entropy import linear_cross_entropy
from ..padding import labelled_rows
from .config import ACTIVATIONS, EncoderConfig, as_config
from .encoder import BertModel, RobertaModel
from .outputs import MaskedLMOutput, QuestionAnsweringModelOutput, SequenceClassifierOutput, TokenClassifierOutput
from .pretrained import PreTrainedEncoder, _resize_rows_

# --------------------------------------------------------------------------------------------- losses


def classification_loss(config: EncoderConfig, logits, labels, num_labels):
    """transformers' rule: regression (MSE) for one label, cross entropy for integer labels, else BCE
    (multi-label); the choice is stored in config.problem_type the first time. None without labels."""
    if labels is None:
        return None
    labels = labels.to(logits.device)
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


def token_loss(logits, labels, num_classes):
    """Cross entropy over labels (B, S) (-100 = ignored) of logits (B, S, num_classes); None without labels."""
    if labels is None:
        return None
    return F.cross_entropy(logits.view(-1, num_classes), labels.to(logits.device).view(-1))


def masked_lm_loss(head, hidden, labels, *, backend=None):
    """Masked-LM loss without the logits: head.transform (dense + GELU + LayerNorm) on the positions with a label
    (labels != -100; selecting them reads the labels on the host once), then ops.linear_cross_entropy with the
    decoder (tied to the word embeddings) and the bias; the mean over those positions, as F.cross_entropy.
    hidden (B, S, H), labels (B, S) -> scalar. The CUDA C++ backend has no linear_cross_entropy kernel: a model
    built with backend="cuda" lets this op choose its own."""
    rows, targets = labelled_rows(hidden, labels)  # (n, H), (n,): the labelled positions
    h = head.transform(rows, backend=backend)
    return linear_cross_entropy(h, head.decoder.weight, head.decoder.bias, targets,
                                backend=None if backend == "cuda" else backend)


def qa_loss(start_logits, end_logits, start_positions, end_positions):
    """Mean of the start and end cross entropies; positions outside the sequence are ignored."""
    if start_positions is None or end_positions is None:
        return None
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    ignored = start_logits.size(1)
    start_positions = start_positions.clamp(0, ignored)
    end_positions = end_positions.clamp(0, ignored)
    return (F.cross_entropy(start_logits, start_positions, ignore_index=ignored)
            + F.cross_entropy(end_logits, end_positions, ignore_index=ignored)) / 2


def _classifier_dropout(cfg: EncoderConfig) -> float:
    return cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob


def _dropout(module: nn.Module, x, p):
    return F.dropout(x, p, training=True) if module.training and p > 0 else x


# --------------------------------------------------------------------------------------------- head modules


class RobertaLMHead(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def transform(self, x, backend=None):
        """x (..., hidden) -> LayerNorm(GELU(dense(x))) (..., hidden)."""
        x = ops.bias_gelu(F.linear(x, self.dense.weight), self.dense.bias, "none", backend=backend)
        return ops.layer_norm(x, self.layer_norm.weight, self.layer_norm.bias, self.layer_norm.eps, backend=backend)

    def forward(self, x, backend=None):
        """x (..., hidden) -> LayerNorm(GELU(dense(x))) @ decoder (..., vocab)."""
        return F.linear(self.transform(x, backend=backend), self.decoder.weight, self.decoder.bias)  # (..., vocab)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.approximate = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x, backend=None):
        """x (..., hidden) -> LayerNorm(act(dense(x))) (..., hidden)."""
        if self.approximate is None:
            x = F.relu(F.linear(x, self.dense.weight, self.dense.bias))
        else:
            x = ops.bias_gelu(F.linear(x, self.dense.weight), self.dense.bias, self.approximate, backend=backend)
        return ops.layer_norm(x, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps, backend=backend)


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, backend=None):
        """x (..., hidden) -> (..., vocab)."""
        return F.linear(self.transform(x, backend=backend), self.decoder.weight, self.decoder.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)

    def forward(self, x, backend=None):
        """x (..., hidden) -> (..., vocab)."""
        return self.predictions(x, backend=backend)


class RobertaClassificationHead(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)
        self.dropout_p = _classifier_dropout(cfg)

    def forward(self, seq):
        """seq (B, S, hidden) -> logits (B, num_labels) from the first token: dropout, dense, tanh, dropout,
        out_proj."""
        x = _dropout(self, seq[:, 0], self.dropout_p)  # (B, hidden)
        x = _dropout(self, torch.tanh(F.linear(x, self.dense.weight, self.dense.bias)), self.dropout_p)
        return F.linear(x, self.out_proj.weight, self.out_proj.bias)  # (B, num_labels)


# --------------------------------------------------------------------------------------------- head models


class _Head(PreTrainedEncoder):
    """An encoder (under base_model_prefix, pooler per _add_pooling_layer) and a head built by _build_head."""

    _encoder_cls = None
    _add_pooling_layer = False

    def __init__(self, config, *, backend=None, padding_free=True, cuda_graphs=False):
        super().__init__()
        self.config = as_config(config)
        setattr(self, self.base_model_prefix,
                self._encoder_cls(self.config, add_pooling_layer=self._add_pooling_layer, backend=backend,
                                  padding_free=padding_free, cuda_graphs=cuda_graphs, _init=False))
        self.num_labels = self.config.num_labels
        self._build_head()
        self.post_init()

    def _encode(self, return_dict=None, **kwargs):
        """The encoder's EncoderOutput for the head's inputs, and whether the caller wants an output object
        (return_dict None: the config's)."""
        return self.base_model(**kwargs, return_dict=True), self.config.return_dict if return_dict is None \
            else bool(return_dict)

    @staticmethod
    def _finish(out_cls, return_dict, loss, fields, enc):
        """`out_cls` (an output class) from the loss, the head's fields and the encoder's extras, or its
        to_tuple() (None fields skipped), as transformers returns it."""
        names = [f for f in out_cls._fields if f not in ("loss", "hidden_states", "attentions")]
        out = out_cls(loss=loss, hidden_states=enc.hidden_states, attentions=enc.attentions,
                      **dict(zip(names, fields)))
        return out if return_dict else out.to_tuple()


class _MaskedLM(_Head):
    # model.fused_loss = True (roberta-fast pretrain sets it): training with labels runs the head's dense + GELU +
    # LayerNorm on the labelled positions only, the decoder and the loss through ops.linear_cross_entropy (no
    # (tokens, vocab) logits), and `logits` is None then. Off by default: transformers' contract (logits in every
    # mode). docs/pretraining.md.
    fused_loss = False

    def _lm_head(self):
        raise NotImplementedError

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (RobertaLMHead, BertLMPredictionHead)):
            with torch.no_grad():
                module.bias.zero_()

    def get_output_embeddings(self):
        return self._lm_head().decoder

    def _resize_output(self, n, mean_resizing):
        """The decoder's rows (when not tied to the word embeddings, which are resized already) and the bias."""
        head = self._lm_head()
        if head.decoder.weight is not self.get_input_embeddings().weight:
            _resize_rows_(head.decoder.weight, n, mean_resizing, self.config.initializer_range)
        _resize_rows_(head.bias, n, mean_resizing, self.config.initializer_range)
        head.decoder.out_features = n

    def tie_weights(self):
        head = self._lm_head()
        if self.config.tie_word_embeddings:
            head.decoder.weight = self.base_model.embeddings.word_embeddings.weight
        head.decoder.bias = head.bias

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, return_logits=None, **kwargs):
        """logits (B, S, vocab); loss: cross entropy over labels (B, S) (-100 = ignored).

        Fused loss (training mode, labels given, self.fused_loss True, return_logits not True): the loss of
        `masked_lm_loss`, equal to transformers' (same mean over the labelled positions), computed without the
        logits, and `logits` is None (the tuple output then starts (loss, ...) and holds no logits). In eval mode,
        without labels, with return_logits=True or fused_loss False: logits for every position, as transformers.
        """
        enc, rd = self._encode(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        if labels is not None and self.fused_loss and self.training and not return_logits:
            loss = masked_lm_loss(self._lm_head(), enc.last_hidden_state, labels, backend=self.backend)
            return self._finish(MaskedLMOutput, rd, loss, (None,), enc)
        logits = self._lm_head()(enc.last_hidden_state, backend=self.backend)  # (B, S, vocab)
        loss = token_loss(logits, labels, self.config.vocab_size)
        return self._finish(MaskedLMOutput, rd, loss, (logits,), enc)


class RobertaForMaskedLM(_MaskedLM):
    base_model_prefix = "roberta"
    _roberta = True
    _encoder_cls = RobertaModel

    def _build_head(self):
        self.lm_head = RobertaLMHead(self.config)

    def _lm_head(self):
        return self.lm_head


class BertForMaskedLM(_MaskedLM):
    base_model_prefix = "bert"
    _encoder_cls = BertModel

    def _build_head(self):
        self.cls = BertOnlyMLMHead(self.config)

    def _lm_head(self):
        return self.cls.predictions


class RobertaForSequenceClassification(_Head):
    base_model_prefix = "roberta"
    _roberta = True
    _encoder_cls = RobertaModel

    def _build_head(self):
        self.classifier = RobertaClassificationHead(self.config)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        """logits (B, num_labels) from the first token (RobertaClassificationHead)."""
        enc, rd = self._encode(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        logits = self.classifier(enc.last_hidden_state)  # (B, num_labels)
        loss = classification_loss(self.config, logits, labels, self.num_labels)
        return self._finish(SequenceClassifierOutput, rd, loss, (logits,), enc)


class BertForSequenceClassification(_Head):
    base_model_prefix = "bert"
    _encoder_cls = BertModel
    _add_pooling_layer = True

    def _build_head(self):
        self.classifier = nn.Linear(self.config.hidden_size, self.config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        """logits (B, num_labels) from the pooler output (tanh(dense(first token)))."""
        enc, rd = self._encode(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        x = _dropout(self, enc.pooler_output, _classifier_dropout(self.config))  # (B, hidden)
        logits = self.classifier(x)  # (B, num_labels)
        loss = classification_loss(self.config, logits, labels, self.num_labels)
        return self._finish(SequenceClassifierOutput, rd, loss, (logits,), enc)


class _TokenClassification(_Head):
    def _build_head(self):
        self.classifier = nn.Linear(self.config.hidden_size, self.config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        """logits (B, S, num_labels); loss: cross entropy over labels (B, S) (-100 = ignored)."""
        enc, rd = self._encode(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        x = _dropout(self, enc.last_hidden_state, _classifier_dropout(self.config))  # (B, S, hidden)
        logits = self.classifier(x)  # (B, S, num_labels)
        loss = token_loss(logits, labels, self.num_labels)
        return self._finish(TokenClassifierOutput, rd, loss, (logits,), enc)


class RobertaForTokenClassification(_TokenClassification):
    base_model_prefix = "roberta"
    _roberta = True
    _encoder_cls = RobertaModel


class BertForTokenClassification(_TokenClassification):
    base_model_prefix = "bert"
    _encoder_cls = BertModel


class _QuestionAnswering(_Head):
    def _build_head(self):
        self.qa_outputs = nn.Linear(self.config.hidden_size, self.config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, **kwargs):
        """start_logits, end_logits (B, S); loss from start_positions / end_positions (B,)."""
        enc, rd = self._encode(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        logits = self.qa_outputs(enc.last_hidden_state)  # (B, S, 2)
        start, end = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))  # (B, S) each
        loss = qa_loss(start, end, start_positions, end_positions)
        return self._finish(QuestionAnsweringModelOutput, rd, loss, (start, end), enc)


class RobertaForQuestionAnswering(_QuestionAnswering):
    base_model_prefix = "roberta"
    _roberta = True
    _encoder_cls = RobertaModel


class BertForQuestionAnswering(_QuestionAnswering):
    base_model_prefix = "bert"
    _encoder_cls = BertModel
