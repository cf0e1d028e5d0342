"""roberta_fast: a fast drop-in BERT-family encoder on NVIDIA GPUs.

    from roberta_fast import RobertaModel          # in place of transformers'
    model = roberta_fast.optimize(hf_model)        # or on a transformers model you already have

The op layer (`roberta_fast.ops`) holds the fused kernels; every op runs on one of three backends:
"torch" (plain PyTorch reference), "triton" (kernels/) or "cuda" (csrc/, the compiled roberta_fast._C).
Importing this package needs no GPU and no compiled module.
"""

from . import ops, reference  # noqa: F401

__version__ = "0.1.0"

_LAZY = {
    # model.py: the encoder and its heads
    "RobertaModel": "model", "BertModel": "model", "XLMRobertaModel": "model",
    "RobertaForMaskedLM": "model", "RobertaForSequenceClassification": "model",
    "RobertaForTokenClassification": "model", "RobertaForQuestionAnswering": "model",
    "BertForMaskedLM": "model", "BertForSequenceClassification": "model",
    "BertForTokenClassification": "model", "BertForQuestionAnswering": "model",
    "EncoderConfig": "model", "pool": "model",
    "optimize": "optimize",
}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'roberta_fast' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{mod}", __name__), name)
