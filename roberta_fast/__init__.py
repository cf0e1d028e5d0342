"""roberta_fast: a fast drop-in BERT-family encoder on NVIDIA GPUs.

    from roberta_fast import RobertaModel          # in place of transformers'
    model = roberta_fast.optimize(hf_model)        # or on a transformers model you already have

The op layer (`roberta_fast.ops`) holds the fused kernels; every op runs on one of three backends:
"torch" (plain PyTorch reference), "triton" (kernels/) or "cuda" (csrc/, the compiled roberta_fast._C).
Importing this package needs no GPU and no compiled module.

CUDA graphs: `cuda_graphs=True` (or `CudaGraphs(...)`) on from_pretrained, the model classes and optimize();
`roberta_fast.graphs.clear(model)` / `roberta_fast.graphs.stats(model)` (roberta_fast/model/graphs.py).
"""

from . import backends, ops, reference  # noqa: F401
from ._version import __version__  # noqa: F401
from .embed import Embedder  # noqa: F401  (sentence embeddings: roberta_fast/embed/, docs/embedding.md)
from .model import (  # noqa: F401
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    EncoderConfig,
    RobertaForMaskedLM,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
    XLMRobertaModel,
    graphs,  # roberta_fast.graphs: CudaGraphs, clear, stats
    pool,
)
from .model.graphs import CudaGraphs  # noqa: F401
from .optimize import optimize  # noqa: F401  (bound after the submodule: the name is the function)
