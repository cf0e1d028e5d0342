"""The op layer: public functions, torch.library custom ops (fake impl + autograd) and argument checks;
the backend of each call comes from roberta_fast.backends (torch | triton | cuda). See each function's
docstring for shapes and dtypes."""

from ..backends import BACKENDS, BackendUnavailableError  # noqa: F401
from .attention import attention, attention_varlen  # noqa: F401
from .bias_gelu import bias_gelu  # noqa: F401
from .layer_norm import layer_norm  # noqa: F401
from .linear import linear  # noqa: F401
from .linear_cross_entropy import linear_cross_entropy  # noqa: F401
from .lsh_attention import lsh_attention, lsh_attention_varlen  # noqa: F401
from .masked_softmax import masked_softmax  # noqa: F401

__all__ = ["layer_norm", "bias_gelu", "masked_softmax", "attention", "attention_varlen", "linear_cross_entropy",
           "linear", "lsh_attention", "lsh_attention_varlen", "BACKENDS", "BackendUnavailableError"]
