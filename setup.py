"""Build script for roberta_fast.

Python package: roberta_fast/ (API), kernels/ (Triton kernels, installed as roberta_fast.kernels) and
benchmarks/ (the harness, installed as roberta_fast.benchmarks), so a wheel holds everything the CLI runs.
The sdist also carries csrc/ (MANIFEST.in), so an install from it can build the CUDA extension.

CUDA extension roberta_fast._C (csrc/): built with nvcc through ninja when nvcc is found
(CUDA_HOME/bin/nvcc or PATH). The build needs only nvcc, the CUDA headers and pybind11, not torch.
  ROBERTA_FAST_CUDA=0        skip the CUDA build
  ROBERTA_FAST_CUDA=1        require it: missing csrc/ sources, a missing nvcc or a failed build is an error
  (unset)                    build when nvcc is found, else skip with one line
  ROBERTA_FAST_CUDA_ARCHS    semicolon/comma list of targets, default "80;90a" (90a: -gencode
                             arch=compute_90a,code=sm_90a)
  ROBERTA_FAST_CUDA_BUILD_DIR  where the objects and build.ninja live (default build/csrc)
The build log with every kernel's ptxas report (registers, spills) is kept beside the module as
roberta_fast/_C_build.log; tests/test_cuda_build.py reads it.

Emulated extension roberta_fast._C_emu (csrc/ again, compiled by the host C++ compiler with -DRF_EMULATE
against the emulation layer in csrc/emu/; docs/cuda_emulation.md): runs every CUDA C++ kernel on CPU
tensors, for tests. Needs only a C++17 compiler, pybind11 and ninja, so it builds on any CI machine.
  ROBERTA_FAST_CUDA_EMULATE_BUILD=0  skip it
  ROBERTA_FAST_CUDA_EMULATE_BUILD=1  require it: a missing compiler or a failed build is an error
  (unset)                            build it; a failure is an error in a checkout (editable or in-place
                                     builds: development and CI, where it means csrc/ is broken), and
                                     one line and a normal finish when building a wheel for a user
  ROBERTA_FAST_CUDA_EMULATE_BUILD_DIR  objects and build.ninja (default build/csrc_emu); incremental
The build itself lives in csrc/emu/build.py (also used by the tests for the ASan and planted-bug builds).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90a"
# Written once: optimized, line info for profilers, the ptxas report (-v) kept in the build log,
# and every warning an error (host compiler, nvcc front end, ptxas: a register spill fails the build).
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++17", "-Xptxas", "--warn-on-spills", "-Xptxas", "-v",
              "-Xptxas", "-Werror", "-Werror", "all-warnings", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror"]
CXX_FLAGS = ["-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror"]
# persistent, so a re-install only recompiles what changed (ROBERTA_FAST_CUDA_BUILD_DIR moves it)
BUILD_DIR = Path(os.environ.get("ROBERTA_FAST_CUDA_BUILD_DIR") or ROOT / "build" / "csrc").resolve()
LOG_NAME = "_C_build.log"  # the compile commands and ptxas reports, kept beside the module
EMU_BUILD_DIR = Path(os.environ.get("ROBERTA_FAST_CUDA_EMULATE_BUILD_DIR") or ROOT / "build" / "csrc_emu").resolve()


def _switch(name: str) -> str:
    """"auto" (unset), "off" (0) or "on" (1) for a build switch such as ROBERTA_FAST_CUDA."""
    v = os.environ.get(name, "").strip().lower()
    if v in ("", "auto"):
        return "auto"
    if v in ("0", "false", "no", "off"):
        return "off"
    if v in ("1", "true", "yes", "on"):
        return "on"
    raise SystemExit(f"{name} must be 0 or 1 (or unset), got {v!r}")


def _cuda_mode():
    return _switch("ROBERTA_FAST_CUDA")


def _emu_mode():
    return _switch("ROBERTA_FAST_CUDA_EMULATE_BUILD")


def emu_builder():
    """csrc/emu/build.py, loaded by path (nothing is installed yet when setup.py runs)."""
    spec = importlib.util.spec_from_file_location("roberta_fast_emu_build", ROOT / "csrc" / "emu" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_archs():
    """(["80", "90a"], the matching -gencode flags); ROBERTA_FAST_CUDA_ARCHS="80;90a" overrides."""
    raw = os.environ.get("ROBERTA_FAST_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().removeprefix("sm_") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs:
        raise SystemExit("ROBERTA_FAST_CUDA_ARCHS names no architecture")
    for a in archs:
        if not (a.rstrip("af").isdigit() and int(a.rstrip("af")) >= 80):
            raise SystemExit(f"ROBERTA_FAST_CUDA_ARCHS: {a!r} is not an architecture >= 80 (like 80, 90a)")
    return archs, [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _ninja():
    exe = shutil.which("ninja")
    if exe is None:
        import ninja as _ninja

        exe = str(Path(_ninja.BIN_DIR) / "ninja")
    return exe


def write_build_ninja(bdir: Path, out: Path, nvcc: str, cxx: str) -> list:
    """build.ninja compiling csrc/*.cu with nvcc and csrc/*.cpp with the host compiler into `out`.

    Each object's compiler output (the ptxas report) goes to <object>.log, so the full report
    survives incremental rebuilds. Returns the log files in a fixed order.
    """
    import pybind11

    _, arch_flags = cuda_archs()
    csrc = ROOT / "csrc"
    cu = sorted(csrc.glob("*.cu"))
    cpp = sorted(csrc.glob("*.cpp"))
    py_inc = sysconfig.get_paths()["include"]
    cu_flags = NVCC_FLAGS + arch_flags + [f"-I{csrc}"]
    cxx_flags = CXX_FLAGS + [f"-I{csrc}", f"-isystem {pybind11.get_include()}", f"-isystem {py_inc}"]
    keep_log = "> $out.log 2>&1 || (cat $out.log; exit 1)"
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        f"cxx = {cxx}",
        f"cu_flags = {' '.join(cu_flags)}",
        f"cxx_flags = {' '.join(cxx_flags)}",
        f"arch_flags = {' '.join(arch_flags)}",  # the link's (empty) device-link images get these archs too
        "rule cu",
        f"  command = $nvcc $cu_flags -MD -MF $out.d -c $in -o $out {keep_log}",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule cxx",
        f"  command = $cxx $cxx_flags -MD -MF $out.d -c $in -o $out {keep_log}",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = c++ $in",
        "rule link",
        f"  command = $nvcc -shared -cudart static $arch_flags $in -o $out {keep_log}",
        "  description = link $out",
    ]
    objs = []
    for s in cu + cpp:
        o = bdir / (s.name + ".o")
        objs.append(o)
        lines.append(f"build {o}: {'cu' if s.suffix == '.cu' else 'cxx'} {s}")
    lines.append(f"build {out}: link {' '.join(map(str, objs))}")
    (bdir / "build.ninja").write_text("\n".join(lines) + "\n")
    return [Path(str(o) + ".log") for o in objs] + [Path(str(out) + ".log")]


class NinjaCudaBuild(build_ext):
    """Compiles csrc/ into roberta_fast/_C with nvcc and the host compiler through build/csrc/build.ninja.

    Without ROBERTA_FAST_CUDA=1 a failed build is not an error: the extension is dropped from the outputs
    (nothing to copy into the wheel or the source tree) and the package works without it."""

    def run(self):
        # setuptools clears `inplace` while building and copies the module back afterwards
        self._to_source = bool(self.inplace or getattr(self, "editable_mode", False))
        self._failed = set()
        super().run()

    def _built_only(self):
        """self.extensions without the ones whose build failed (for the copy / output steps)."""
        return [e for e in self.extensions if e.name not in getattr(self, "_failed", ())]

    def get_outputs(self):
        keep, self.extensions = self.extensions, self._built_only()
        try:
            return super().get_outputs()
        finally:
            self.extensions = keep

    def get_output_mapping(self):
        keep, self.extensions = self.extensions, self._built_only()
        try:
            return super().get_output_mapping()
        finally:
            self.extensions = keep

    def copy_extensions_to_source(self):
        keep, self.extensions = self.extensions, self._built_only()
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = keep

    def build_extension(self, ext):
        if ext.name == "roberta_fast._C_emu":
            return self._build_emulated(ext)
        if ext.name != "roberta_fast._C":
            return super().build_extension(ext)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        try:
            self._build_cuda(out)
        except Exception as e:  # noqa: BLE001
            if _cuda_mode() == "on":
                raise
            self._failed.add(ext.name)
            print(f"roberta_fast: CUDA extension build failed ({e}); continuing without roberta_fast._C")

    def _build_cuda(self, out: Path):
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or PATH)")
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            raise RuntimeError("no host C++ compiler (c++ or g++, or set CXX)")
        archs, _ = cuda_archs()
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        target = BUILD_DIR / out.name
        logs = write_build_ninja(BUILD_DIR, target, nvcc, cxx)
        print(f"roberta_fast: building the CUDA extension for sm_{', sm_'.join(archs)} with {nvcc}")
        t0 = time.perf_counter()
        res = subprocess.run([_ninja(), "-C", str(BUILD_DIR)], capture_output=True, text=True)
        sys.stdout.write(res.stdout + res.stderr)
        if res.returncode != 0:
            raise RuntimeError(f"the nvcc build failed (see the output above; build files in {BUILD_DIR})")
        header = (f"# roberta_fast._C build: archs {';'.join(archs)}, ninja took {time.perf_counter() - t0:.1f} s "
                  f"(recompiling only what changed), nvcc {nvcc}\n")
        log = header + "".join(f"# ---- {p.name}\n" + (p.read_text() if p.exists() else "") for p in logs)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(target, out)
        # the ptxas report beside the module, where tests/test_cuda_build.py reads it
        (out.parent / LOG_NAME).write_text(log)
        if getattr(self, "_to_source", False):
            (ROOT / "roberta_fast" / LOG_NAME).write_text(log)

    def _build_emulated(self, ext):
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        try:
            built = emu_builder().build(EMU_BUILD_DIR)
        except Exception as e:  # noqa: BLE001
            if _emu_mode() == "on" or getattr(self, "_to_source", False):
                raise RuntimeError(f"roberta_fast: the emulated build roberta_fast._C_emu failed: {e}\n(set "
                                   "ROBERTA_FAST_CUDA_EMULATE_BUILD=0 to skip it)") from e
            self._failed.add(ext.name)
            print(f"roberta_fast: emulated build failed ({e}); continuing without roberta_fast._C_emu")
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, out)


class BuildPy(build_py):
    """The wheel leaves out the pytest-benchmark entry of benchmarks/ (test_*.py, conftest.py): it runs
    from a checkout (`pytest benchmarks/ --benchmark-only`), the installed harness never imports it."""

    def find_package_modules(self, package, package_dir):
        mods = super().find_package_modules(package, package_dir)
        if package != "roberta_fast.benchmarks":
            return mods
        return [m for m in mods if not (m[1].startswith("test_") or m[1] == "conftest")]


def ext_modules():
    return cuda_ext_modules() + emu_ext_modules()


def emu_ext_modules():
    mode = _emu_mode()
    if mode == "off":
        print("roberta_fast: ROBERTA_FAST_CUDA_EMULATE_BUILD=0, skipping the emulated build roberta_fast._C_emu")
        return []
    if not list((ROOT / "csrc").glob("*.cu")) or not (ROOT / "csrc" / "emu" / "build.py").exists():
        if mode == "on":
            raise SystemExit("roberta_fast: ROBERTA_FAST_CUDA_EMULATE_BUILD=1 but the sources are not in "
                             f"{ROOT / 'csrc'}")
        print("roberta_fast: no csrc/ sources, skipping the emulated build roberta_fast._C_emu")
        return []
    if emu_builder().find_cxx() is None:
        if mode == "on":
            raise SystemExit("roberta_fast: ROBERTA_FAST_CUDA_EMULATE_BUILD=1 but no host C++ compiler was found "
                             "(c++, g++, clang++ or CXX)")
        print("roberta_fast: no host C++ compiler, skipping the emulated build roberta_fast._C_emu")
        return []
    return [Extension("roberta_fast._C_emu", sources=[])]


def cuda_ext_modules():
    mode = _cuda_mode()
    if mode == "off":
        print("roberta_fast: ROBERTA_FAST_CUDA=0, skipping the CUDA extension (Triton and torch backends only)")
        return []
    if not list((ROOT / "csrc").glob("*.cu")):
        if mode == "on":
            raise SystemExit(f"roberta_fast: ROBERTA_FAST_CUDA=1 but there are no CUDA sources in {ROOT / 'csrc'} "
                             "(install from a checkout or from the sdist, which carries csrc/)")
        print("roberta_fast: no csrc/*.cu sources, skipping the CUDA extension")
        return []
    if find_nvcc() is None:
        if mode == "on":
            raise SystemExit("roberta_fast: ROBERTA_FAST_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        print("roberta_fast: nvcc not found, skipping the CUDA extension (Triton and torch backends only)")
        return []
    cuda_archs()  # a bad ROBERTA_FAST_CUDA_ARCHS stops here, before anything is built
    return [Extension("roberta_fast._C", sources=[])]


setup(
    packages=["roberta_fast", *(f"roberta_fast.{p}" for p in find_packages("roberta_fast")), "roberta_fast.kernels",
              "roberta_fast.benchmarks"],
    package_dir={"roberta_fast": "roberta_fast", "roberta_fast.kernels": "kernels",
                 "roberta_fast.benchmarks": "benchmarks"},
    package_data={"roberta_fast.benchmarks": ["gpu_suite.sh"]},
    ext_modules=ext_modules(),
    cmdclass={"build_ext": NinjaCudaBuild, "build_py": BuildPy},
)
