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

The bind_* functions serve a caller that makes many inference calls of ONE signature (the encoder's layers,
bound once per forward): the backend chosen once, they return the kernel backend's own inference function
(called directly, no choice, no checks), or None where the calls must take the entry points above (autograd,
torch.compile, autocast, a dispatch mode, the torch backend). The caller guarantees that every call has the
signature of the one it bound with.
"""

from .attention import attention_trusted as attention  # noqa: F401
from .attention import attention_varlen_trusted as attention_varlen  # noqa: F401
from .attention import bind_inference as bind_attention  # noqa: F401
from .attention import bind_varlen_inference as bind_attention_varlen  # noqa: F401
from .bias_gelu import bias_gelu_trusted as bias_gelu  # noqa: F401
from .bias_gelu import bind_inference as bind_bias_gelu  # noqa: F401
from .layer_norm import bind_inference as bind_layer_norm  # noqa: F401
from .layer_norm import layer_norm_trusted as layer_norm  # noqa: F401
from .masked_softmax import masked_softmax_trusted as masked_softmax  # noqa: F401

__all__ = ["layer_norm", "bias_gelu", "masked_softmax", "attention", "attention_varlen", "bind_layer_norm",
           "bind_bias_gelu", "bind_attention", "bind_attention_varlen"]
