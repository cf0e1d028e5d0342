"""The kernels stay within what every supported Triton has (3.2 and later; see docs/compat.md).

Checked here without installing another Triton: no kernel file uses a triton.language name or keyword
added after 3.2 (or removed since), the ahead-of-time driver builds an ASTSource through the 3.2 API
as well as the current one, and the interpreter shim of kernels/_compat.py (Triton <= 3.6 with
NumPy >= 2.4) gives the right index through both of the interpreter's patching conventions.
"""

import ast
import operator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import triton
from roberta_fast.kernels import _aot, _compat

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"

# names of triton.language that 3.2 lacks (diff of dir(triton.language), 3.2.0 vs 3.9.0), and the one
# 3.2 has that 3.9 dropped
TL_NOT_IN_ALL = {
    "aggregate_replace", "atomic_load", "atomic_poll", "atomic_store", "bitonic_merge", "condition",
    "constexpr_type", "expect_zero", "gather", "load_tensor_descriptor", "make_tensor_descriptor",
    "map_elementwise", "mul", "reduce_or", "slice", "squeeze", "store_tensor_descriptor", "sub",
    "target_info", "tensor_descriptor", "tensor_descriptor_type", "to_tensor", "topk", "tuple",
    "tuple_type", "unsqueeze",
    "advance",  # gone in 3.9
}
TRITON_NOT_IN_32 = {"AsyncCompileMode", "FutureKernel", "aggregate", "constexpr_function", "knobs",
                    "must_use_result", "set_allocator"}
# keyword arguments added after 3.2 to functions 3.2 already has
TL_KWARGS_NOT_IN_32 = {
    "range": {"disallow_acc_multi_buffer", "flatten", "warp_specialize", "disable_licm"},
    "cat": {"dim"}, "device_assert": {"mask"}, "fdiv": {"approx"}, "histogram": {"mask"},
    "sort": {"dim", "descending"}, "dot_scaled": {"fast_math", "lhs_k_pack", "rhs_k_pack"},
}


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _uses(src: str):
    """(line, dotted name) of every attribute chain, (line, function, keyword) of every keyword argument."""
    tree = ast.parse(src)
    names, kwargs = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (name := _dotted(node)):
            names.append((node.lineno, name))
        if isinstance(node, ast.Call) and (name := _dotted(node.func)):
            kwargs += [(node.lineno, name, k.arg) for k in node.keywords if k.arg]
    return names, kwargs


def _feature_checked(src: str) -> set:
    """"tl.x" / "triton.x" names the file checks with hasattr(tl, "x") / hasattr(triton, "x"): used only behind
    that check (e.g. kernels/linear.py's TMA path, HAS_TMA), they never run on a Triton that lacks them."""
    out = set()
    for node in ast.walk(ast.parse(src)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
                and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)
                and (mod := _dotted(node.args[0])) in ("tl", "triton")):
            out.add(f"{mod}.{node.args[1].value}")
    return out


@pytest.mark.parametrize("path", sorted(KERNEL_DIR.glob("*.py")), ids=lambda p: p.name)
def test_kernel_files_use_no_triton_api_outside_32_to_39(path):
    src = path.read_text()
    names, kwargs = _uses(src)
    gated = _feature_checked(src)
    bad = []
    for line, name in names:
        parts = name.split(".")
        if ".".join(parts[:2]) in gated:
            continue
        if parts[0] in ("tl", "triton") and len(parts) >= 2:
            if parts[0] == "tl" and parts[1] in TL_NOT_IN_ALL:
                bad.append(f"{path.name}:{line}: {name}")
            if parts[0] == "triton" and parts[1] in TRITON_NOT_IN_32:
                bad.append(f"{path.name}:{line}: {name}")
            if parts[:2] == ["triton", "language"] and len(parts) > 2 and parts[2] in TL_NOT_IN_ALL:
                bad.append(f"{path.name}:{line}: {name}")
    for line, fn, kw in kwargs:
        parts = fn.split(".")
        if parts[0] == "tl" and kw in TL_KWARGS_NOT_IN_32.get(parts[-1], ()):
            bad.append(f"{path.name}:{line}: {fn}(..., {kw}=)")
    assert not bad, "Triton API newer than 3.2 (or gone in 3.9): " + "; ".join(bad)


def test_api_scan_finds_new_names():
    """The scan itself: it flags a 3.3+ name and keyword in a file written for the purpose."""
    src = "x = tl.gather\ny = triton.knobs\nfor i in tl.range(0, 4, flatten=True):\n    pass\n"
    names, kwargs = _uses(src)
    assert (1, "tl.gather") in names and (2, "triton.knobs") in names
    assert (3, "tl.range", "flatten") in kwargs
    gated = 'HAS = hasattr(tl, "gather") and hasattr(triton, "knobs")\nx = tl.gather\n'
    assert _feature_checked(gated) == {"tl.gather", "triton.knobs"} and _feature_checked(src) == set()


# ----------------------------------------------------------------------------- AOT driver, both APIs


def _attention_spec():
    return next(s for s in _aot.all_specs(["attention"]) if s.aligned)


def test_specs_give_every_constexpr_a_value():
    """Triton 3.2 drops the names given in `constants` from the argument types and 3.3+ the
    "constexpr" entries: both need the two lists to match."""
    for spec in _aot.all_specs():
        kinds = {n for n, t in spec.signature.items() if t == "constexpr"}
        assert kinds == set(spec.constexprs), spec.name
        assert list(spec.signature) == list(spec.fn.arg_names), spec.name


def test_make_ast_source_current_api():
    if _compat.triton_version() < (3, 3):
        pytest.skip("Triton 3.2: the 3.2 branch is covered with a stand-in below")
    spec = _attention_spec()
    src = _aot.make_ast_source(spec, aligned=True)
    want = {(spec.fn.arg_names.index(a),) for a in spec.aligned}
    assert set(src.attrs) == want
    assert all(v == [["tt.divisibility", 16]] for v in src.attrs.values())
    assert {spec.fn.arg_names[k[0]]: v for k, v in src.constants.items()} == spec.constexprs
    assert not _aot.make_ast_source(spec).attrs


def test_make_ast_source_triton32_api(monkeypatch):
    """Triton 3.2's ASTSource(fn, signature, constants=, attrs=AttrsDescriptor), with a stand-in."""
    import triton.backends.compiler
    import triton.compiler

    seen = {}

    class ASTSource32:
        def __init__(self, fn, signature, constants=None, attrs=None):
            seen.update(fn=fn, signature=signature, constants=constants, attrs=attrs)

    class AttrsDescriptor32:
        @classmethod
        def from_hints(cls, hints):
            return ("hints", dict(hints))

    monkeypatch.setattr(triton.compiler, "ASTSource", ASTSource32)
    monkeypatch.setattr(triton.backends.compiler, "AttrsDescriptor", AttrsDescriptor32, raising=False)
    spec = _attention_spec()
    _aot.make_ast_source(spec, aligned=True)
    assert seen["fn"] is spec.fn and seen["signature"] == spec.signature
    assert seen["constants"] == spec.constexprs
    assert seen["attrs"] == ("hints", {spec.fn.arg_names.index(a): 16 for a in spec.aligned})
    _aot.make_ast_source(spec)
    assert seen["attrs"] == ("hints", {})


# ----------------------------------------------------------------------------- interpreter shim


class _Scope:
    """Triton 3.3+'s _LangPatchScope: set_attr remembers, restore puts back in reverse order."""

    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, obj.__dict__.get(name, None)))
        setattr(obj, name, value)

    def restore(self):
        while self.changes:
            obj, name, old = self.changes.pop()
            if old is None:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def _old_patch(tensor, scope=None):
    """What Triton <= 3.6 does: int() of the 1-element, 1-d array that holds a scalar."""
    index = lambda self: int(self.handle.data)
    if scope is None:
        tensor.__index__ = index
    else:
        scope.set_attr(tensor, "__index__", index)


def test_interpreter_index_shim(monkeypatch):
    import triton.runtime.interpreter as interp

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(interp, "_patch_lang_tensor", _old_patch)
    monkeypatch.setattr(_compat, "_numpy_refuses_1d_int", lambda: True)
    monkeypatch.setattr(_compat, "triton_version", lambda: (3, 6))
    assert _compat.patch_interpreter_index()
    assert not _compat.patch_interpreter_index()  # once only

    class Scalar:
        def __init__(self, v):
            self.handle = SimpleNamespace(data=np.array([v], dtype=np.int32))

    scope = _Scope()
    interp._patch_lang_tensor(Scalar, scope)  # 3.3 - 3.6: through the launch's scope
    assert operator.index(Scalar(5)) == 5 and list(range(Scalar(3))) == [0, 1, 2]
    scope.restore()
    assert "__index__" not in Scalar.__dict__
    interp._patch_lang_tensor(Scalar)  # 3.2: set for good
    assert operator.index(Scalar(7)) == 7


def test_interpreter_index_shim_leaves_newer_triton_alone(monkeypatch):
    import triton.runtime.interpreter as interp

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(interp, "_patch_lang_tensor", _old_patch)
    monkeypatch.setattr(_compat, "_numpy_refuses_1d_int", lambda: True)
    monkeypatch.setattr(_compat, "triton_version", lambda: (3, 7))
    assert not _compat.patch_interpreter_index()
    monkeypatch.setattr(_compat, "triton_version", lambda: (3, 6))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _compat.patch_interpreter_index()
    assert interp._patch_lang_tensor is _old_patch


def test_triton_version_parses_installed():
    assert _compat.triton_version() >= (3, 2)
    assert ".".join(map(str, _compat.triton_version())) in triton.__version__
