"""The ops without their argument checks: entry points for callers that guarantee the arguments once
(the model checks its inputs once per forward, and every tensor it hands an op is laid out by itself).

Same arguments (positional or keyword, `backend` included) and results as the public ops in
roberta_fast.ops, which must accept them; what is skipped is only the checking (types, dtypes, shapes,
devices, eps / scale / max_seqlen values, and on CPU tensors the value checks of a float mask and of
cu_seqlens). Bad arguments here give undefined errors instead of the named ones. Everything else is the
public ops' lean path (docs/host_path.md): the backend choice cached per call signature, the backend's
forward called directly in inference, the custom op with autograd and under torch.compile.

    from roberta_fast.ops import trusted
    h = trusted.layer_norm(x, ln.weight, ln.bias, ln.eps, residual=r, x_bias=dense.bias)
"""

from .attention import attention_trusted as attention  # noqa: F401
from .attention import attention_varlen_trusted as attention_varlen  # noqa: F401
from .bias_gelu import bias_gelu_trusted as bias_gelu  # noqa: F401
from .layer_norm import layer_norm_trusted as layer_norm  # noqa: F401
from .masked_softmax import masked_softmax_trusted as masked_softmax  # noqa: F401

__all__ = ["layer_norm", "bias_gelu", "masked_softmax", "attention", "attention_varlen"]
