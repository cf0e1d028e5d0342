"""Build of roberta_fast._C_emu: csrc/ compiled by the host C++ compiler against the emulation layer.

The same sources as roberta_fast._C (csrc/*.cu as C++ with -DRF_EMULATE, csrc/bindings.cpp) plus the
runtime (csrc/emu/*.cpp), through a generated build.ninja, so a rebuild recompiles only what changed.
Needs a C++17 compiler, pybind11 and ninja; no CUDA toolkit.

Used by setup.py (the package's module), by tests/test_cuda_emulation.py (the AddressSanitizer build,
and the planted-bug builds of mutated copies of csrc/) and by hand:

    python csrc/emu/build.py [--asan] [--opt -O0] [--out DIR]     # prints the module's path

Stdlib only: setup.py loads this file by path before anything is installed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

CSRC = Path(__file__).resolve().parents[1]
# -O2: the emulated kernels run 2x faster than at -O1 (3x than -O0) for the same cold build time, about
# 25 s on two cores (docs/cuda_emulation.md has the numbers). -fno-strict-aliasing: CUDA code
# reinterprets freely (16-byte vector loads of half data) and nvcc does not exploit that; neither may we.
OPT = "-O2"
CXX_FLAGS = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-fcf-protection=none",
             "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-DRF_EMULATE"]
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"]
# GCC only: its -Wmaybe-uninitialized fires inside pybind11's and libstdc++'s headers under
# -fsanitize=address (false positives, as GCC's manual warns); it stays a warning, not an error.
GCC_FLAGS = ["-Wno-error=maybe-uninitialized"]
# appended to the compile flags (say "-O0 -g" to step through a kernel in gdb)
FLAGS_ENV = "ROBERTA_FAST_CUDA_EMULATE_FLAGS"


def ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def find_cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def is_gcc(cxx: str) -> bool:
    try:
        res = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in res.stdout and "clang" not in res.stdout.lower()


def _ninja() -> str:
    exe = shutil.which("ninja")
    if exe is None:
        import ninja as _nj

        exe = str(Path(_nj.BIN_DIR) / "ninja")
    return exe


def sources(csrc: Path = CSRC) -> list[Path]:
    """Every translation unit of the emulated module: the kernels' .cu files, the bindings, the runtime."""
    return sorted(csrc.glob("*.cu")) + sorted(csrc.glob("*.cpp")) + sorted((csrc / "emu").glob("*.cpp"))


def object_name(src: Path) -> str:
    return ("emu_" if src.parent.name == "emu" else "") + src.name + ".o"


def objects(build_dir: Path, csrc: Path = CSRC) -> dict[str, Path]:
    """{source path relative to csrc ("attention.cu", "emu/runtime.cpp"): its object in build_dir}."""
    return {str(s.relative_to(csrc)): Path(build_dir) / object_name(s) for s in sources(csrc)}


def write_build_ninja(bdir: Path, out: Path, *, csrc: Path = CSRC, cxx: str, opt: str = OPT,
                      asan: bool = False, prebuilt: dict | None = None) -> Path:
    import pybind11

    py_inc = sysconfig.get_paths()["include"]
    extra = shlex.split(os.environ.get(FLAGS_ENV, ""))
    flags = [opt, *CXX_FLAGS, *(GCC_FLAGS if is_gcc(cxx) else []), *(ASAN_FLAGS if asan else []), *extra, f"-I{csrc}",
             f"-isystem {pybind11.get_include()}", f"-isystem {py_inc}"]
    link = ["-shared", *(ASAN_FLAGS if asan else [])]
    lines = [
        "ninja_required_version = 1.3",
        f"cxx = {cxx}",
        f"flags = {' '.join(flags)}",
        f"ldflags = {' '.join(link)}",
        "rule cu",  # a .cu file as C++: the kernels against emu/cuda_emu.h
        "  command = $cxx -x c++ $flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = c++ (emulated) $in",
        "rule cxx",
        "  command = $cxx $flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = c++ $in",
        "rule link",
        "  command = $cxx $ldflags $in -o $out",
        "  description = link $out",
    ]
    objs = []
    for s in sources(csrc):
        pre = (prebuilt or {}).get(str(s.relative_to(csrc)))
        if pre is not None:  # linked as built elsewhere (same ABI: only the optimization level may differ)
            objs.append(Path(pre))
            continue
        o = bdir / object_name(s)
        objs.append(o)
        lines.append(f"build {o}: {'cu' if s.suffix == '.cu' else 'cxx'} {s}")
    lines.append(f"build {out}: link {' '.join(map(str, objs))}")
    bdir.mkdir(parents=True, exist_ok=True)
    path = bdir / "build.ninja"
    text = "\n".join(lines) + "\n"
    if not path.exists() or path.read_text() != text:  # an unchanged file keeps ninja's state valid
        path.write_text(text)
    return path


def build(build_dir: Path, *, csrc: Path = CSRC, cxx: str | None = None, opt: str = OPT, asan: bool = False,
          jobs: int | None = None, quiet: bool = False, prebuilt: dict | None = None) -> Path:
    """Builds <build_dir>/_C_emu<EXT_SUFFIX> from `csrc` and returns its path; RuntimeError on failure
    (the message holds the compiler's output). `prebuilt` maps sources (relative to csrc, as in
    objects()) to objects to link instead of compiling them: a mutated copy of csrc/ recompiles only
    its kernels and reuses the runtime and the bindings of the package's build."""
    cxx = cxx or find_cxx()
    if cxx is None:
        raise RuntimeError("no host C++ compiler (c++, g++ or clang++ on PATH, or set CXX)")
    build_dir = Path(build_dir).resolve()
    out = build_dir / ("_C_emu" + ext_suffix())
    write_build_ninja(build_dir, out, csrc=Path(csrc).resolve(), cxx=cxx, opt=opt, asan=asan, prebuilt=prebuilt)
    cmd = [_ninja(), "-C", str(build_dir)] + ([f"-j{jobs}"] if jobs else [])
    t0 = time.perf_counter()
    with open(build_dir / ".lock", "w") as lock:  # one ninja per build directory (parallel test workers)
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"the emulated build failed ({' '.join(cmd)}):\n{res.stdout}\n{res.stderr}")
    if not quiet:
        print(f"roberta_fast: emulated build in {build_dir} took {time.perf_counter() - t0:.1f} s")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(CSRC.parent / "build" / "csrc_emu_manual"), help="build directory")
    ap.add_argument("--opt", default=OPT)
    ap.add_argument("--asan", action="store_true")
    a = ap.parse_args()
    try:
        print(build(Path(a.out), opt=a.opt, asan=a.asan))
    except RuntimeError as e:
        sys.exit(str(e))
