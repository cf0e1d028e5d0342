"""EncoderConfig: the fields of a transformers Bert/Roberta config that the encoder uses, and its
conversions (config.json dict, transformers config object)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
BERT_TYPES = ("bert",)
MODEL_TYPES = ROBERTA_TYPES + BERT_TYPES  # config.json's model_type of the checkpoints this encoder loads
# hidden_act -> bias_gelu's approximate (None: plain ReLU)
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "relu": None}


@dataclass
class EncoderConfig:
    """The fields of a transformers Bert/Roberta config that the encoder uses (same names, same meaning)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    model_type: str = "bert"
    tie_word_embeddings: bool = True
    num_labels: int = 2
    classifier_dropout: float | None = None
    problem_type: str | None = None
    id2label: dict | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # forward's defaults when its argument is None, as in transformers
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict: bool = True
    # self-attention: "full" (exact; what RoBERTa and BERT use) or "lsh" (opt-in Reformer-style LSH attention,
    # ops.lsh_attention, for long inputs; docs/lsh_attention.md). Written to config.json only when "lsh".
    attention: str = "full"
    lsh_bucket_size: int = 64
    lsh_num_hashes: int = 2

    def __post_init__(self):
        check_model_type(self.model_type)
        if self.attention not in ("full", "lsh"):
            raise ValueError(f"attention must be 'full' or 'lsh', got {self.attention!r}")
        for name in ("lsh_bucket_size", "lsh_num_hashes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> EncoderConfig:
        """From a config.json dict (unknown keys are ignored; decoder and relative-position configs raise)."""
        d = {**d, **overrides}
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("decoder configs (is_decoder / add_cross_attention) are not supported: this is an encoder")
        pet = d.get("position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise ValueError(f"position_embedding_type {pet!r} is not supported (only 'absolute')")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "num_labels" in overrides:
            kw.pop("id2label", None)
        return cls(**kw)

    @classmethod
    def from_json_file(cls, path, **overrides) -> EncoderConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **overrides)

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> EncoderConfig:
        """From a transformers config object (BertConfig, RobertaConfig, XLMRobertaConfig, ...)."""
        d = {f.name: getattr(hf_config, f.name) for f in fields(cls) if hasattr(hf_config, f.name)}
        d["is_decoder"] = getattr(hf_config, "is_decoder", False)
        d["add_cross_attention"] = getattr(hf_config, "add_cross_attention", False)
        d["position_embedding_type"] = getattr(hf_config, "position_embedding_type", "absolute")
        if getattr(hf_config, "id2label", None) is not None and "num_labels" not in overrides:
            d["id2label"] = dict(hf_config.id2label)
        return cls.from_dict(d, **overrides)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["attention"] == "full":  # the default: config.json stays what it was before the LSH option
            for name in ("attention", "lsh_bucket_size", "lsh_num_hashes"):
                d.pop(name)
        if d["id2label"] is None:
            d.pop("id2label")
        else:
            d["id2label"] = {str(k): v for k, v in d["id2label"].items()}
            d["label2id"] = {v: int(k) for k, v in d["id2label"].items()}
        return d

    def to_hf(self, **kwargs):
        """The equivalent transformers config (needs transformers installed)."""
        from transformers import AutoConfig

        d = self.to_dict()
        model_type = d.pop("model_type")
        d.pop("label2id", None)
        if d.get("id2label") is None:
            d.pop("id2label", None)
        else:
            d.pop("num_labels")
        return AutoConfig.for_model(model_type, **d, **kwargs)


def check_model_type(model_type, where: str = "config"):
    """ValueError unless model_type is one this encoder computes (config.json's `model_type`)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{where}: model type {model_type!r} is not supported (supported: "
                         f"{', '.join(sorted(MODEL_TYPES))}); roberta_fast runs BERT-family encoders only")


def as_config(config) -> EncoderConfig:
    """An EncoderConfig from an EncoderConfig, a config.json dict or a transformers config object."""
    if isinstance(config, EncoderConfig):
        return config
    if isinstance(config, dict):
        return EncoderConfig.from_dict(config)
    if hasattr(config, "hidden_size") and hasattr(config, "num_hidden_layers"):
        return EncoderConfig.from_hf(config)
    raise TypeError(f"config must be an EncoderConfig, a dict or a transformers config, got {type(config).__name__}")
