"""Ahead-of-time compile specs: what a kernel file can launch, in a form triton.compile takes."""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AOTSpec:
    """One launchable specialization of a @triton.jit kernel.

    signature maps every argument name to its Triton type ("*fp16", "i32", "i64", "fp32",
    "constexpr"); constexprs gives the value of each constexpr argument.
    """

    name: str  # a label for the table, e.g. "layer_norm_fwd[fp16,N=768]"
    fn: Any  # the triton.jit function
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    uses_mma: bool = False  # a matrix kernel: HGMMA expected on sm_90, HMMA on sm_80
    # arguments Triton's launcher marks as divisible by 16 when the tensors are aligned (the usual case at
    # run time); a spec that names any is also compiled as that second, aligned variant
    aligned: tuple = ()
    aligned_only: bool = False  # launched only on aligned tensors (e.g. TMA descriptors): no unaligned variant
    min_cc: int = 0  # compiled only for targets of at least this compute capability (e.g. 90: sm_90 only)


TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def ptr(dtype) -> str:
    """Triton pointer type for a torch dtype (or its name)."""
    name = str(dtype).removeprefix("torch.")
    if name == "bool":
        return "*i1"
    if name in ("int8", "uint8"):
        return "*i8" if name == "int8" else "*u8"
    if name in ("int32", "int64"):
        return "*i32" if name == "int32" else "*i64"
    return "*" + TRITON_DTYPE[name]


# ----------------------------------------------------------------------------- the compile check
# Run as `python -m roberta_fast.kernels._aot --cc 90` (never under TRITON_INTERPRET=1: the
# interpreter replaces @triton.jit functions with ones that cannot be compiled).

KERNEL_FILES = ("layer_norm", "bias_gelu", "masked_softmax", "attention", "linear_cross_entropy", "linear",
                "lsh_attention")
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block: A100, H100


def cuobjdump_path():
    import shutil
    from pathlib import Path

    import triton

    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(cand) if cand.exists() else shutil.which("cuobjdump")


def all_specs(files=KERNEL_FILES, every_candidate: bool = False):
    """Every file's aot_specs(); every_candidate: also the tuning candidates a file compiles only on request
    (kernels/linear.py: `aot_specs(every_candidate=True)`; too many for the CI check)."""
    import importlib
    import inspect

    out = []
    for f in files:
        try:
            mod = importlib.import_module(f"roberta_fast.kernels.{f}")
        except ModuleNotFoundError as e:
            if e.name == f"roberta_fast.kernels.{f}":
                continue
            raise
        takes = "every_candidate" in inspect.signature(mod.aot_specs).parameters
        out += list(mod.aot_specs(every_candidate=True) if every_candidate and takes else mod.aot_specs())
    return out


def make_ast_source(spec: AOTSpec, aligned: bool = False):
    """triton.compiler.ASTSource for a spec, on every Triton we support.

    Triton >= 3.3: ASTSource(fn, signature, constexprs={name: value}, attrs={(index,): [[attr, value]]}).
    Triton 3.2: ASTSource(fn, signature, constants={name: value}, attrs=AttrsDescriptor); the signature may
    keep the "constexpr" entries (3.2 drops the names given in constants from the argument types).
    """
    import inspect

    from triton.compiler import ASTSource

    div16 = [spec.fn.arg_names.index(a) for a in spec.aligned] if aligned else []
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        attrs = {(i,): [["tt.divisibility", 16]] for i in div16} if aligned else None
        return ASTSource(spec.fn, dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
    from triton.backends.compiler import AttrsDescriptor  # Triton 3.2

    attrs = AttrsDescriptor.from_hints({i: 16 for i in div16})
    return ASTSource(spec.fn, dict(spec.signature), constants=dict(spec.constexprs), attrs=attrs)


def compile_and_inspect(spec: AOTSpec, cc: int, tool: str, aligned: bool = False) -> dict:
    """Compile one spec for sm_<cc> (its aligned variant if asked); return registers, shared and local
    memory, MMA found, problems."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    row = {"kernel": spec.name + ("+align16" if aligned else ""),
           "config": f"w{spec.num_warps}s{spec.num_stages}", "arch": f"sm_{cc}",
           "regs": None, "smem": None, "local": None, "stack": None, "spill_insts": None, "mma": "", "problems": []}
    try:
        src = make_ast_source(spec, aligned)
        c = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as e:  # noqa: BLE001
        row["problems"].append(f"compile error: {type(e).__name__}: {str(e)[:400]}")
        return row
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(c.asm["cubin"])
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res, re.S)
        if m is None:
            row["problems"].append(f"cannot parse cuobjdump -res-usage: {res[:200]}")
            return row
        row["regs"], row["local"] = int(m.group(1)), int(m.group(3))
        st = re.search(r"STACK:(\d+)", res)
        row["stack"] = int(st.group(1)) if st else None
        row["smem"] = int(c.metadata.shared)
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        # register spills live in the stack frame (STACK) and show as local stores / loads in the SASS; reported,
        # not (yet) a failure: LOCAL (ptxas' local memory) is what the check fails on
        row["spill_insts"] = len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\s", sass))
        if spec.uses_mma:
            want = "HGMMA" if cc >= 90 else "HMMA"
            row["mma"] = want if want in sass else f"no {want}"
            if want not in sass:
                row["problems"].append(f"matrix kernel without {want} in its SASS")
    if row["local"]:
        row["problems"].append(f"{row['local']} bytes of local memory (register spills)")
    if row["smem"] > SMEM_LIMIT[cc]:
        row["problems"].append(f"{row['smem']} bytes of shared memory > the sm_{cc} limit {SMEM_LIMIT[cc]}")
    return row


def format_table(rows) -> str:
    lines = [f"{'kernel':64s} {'config':7s} {'arch':6s} {'regs':>4s} {'smem':>7s} {'local':>5s} {'stack':>5s} "
             f"{'STL/LDL':>7s} mma"]
    for r in rows:
        lines.append(f"{r['kernel']:64s} {r['config']:7s} {r['arch']:6s} {r['regs'] or 0:4d} {r['smem'] or 0:7d} "
                     f"{r['local'] or 0:5d} {r.get('stack') or 0:5d} {r.get('spill_insts') or 0:7d} {r['mma']}")
    return "\n".join(lines)


def main(argv=None):
    import argparse
    import json
    import os

    ap = argparse.ArgumentParser(description="Compile every Triton kernel config ahead of time for a GPU arch.")
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--files", nargs="+", default=list(KERNEL_FILES))
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--every-candidate", action="store_true",
                    help="also compile the tuning candidates a kernel file leaves out of the CI check (linear's)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run the compile check without TRITON_INTERPRET=1")
    tool = cuobjdump_path()
    if tool is None:
        raise SystemExit("no cuobjdump (neither in the triton package nor on PATH)")
    specs = all_specs(args.files, args.every_candidate)
    rows = [compile_and_inspect(s, cc, tool, aligned) for cc in args.cc for s in specs if cc >= s.min_cc
            for aligned in ((True,) if s.aligned_only else (False, True) if s.aligned else (False,))]
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    bad = [f"{r['kernel']} {r['arch']}: {p}" for r in rows for p in r["problems"]]
    for b in bad:
        print("FAIL", b)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
