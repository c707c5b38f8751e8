"""Build (once) and load the AVX2 GEMV extension.

The extension is compiled at first use with `torch.utils.cpp_extension.load` into a cache directory keyed by a hash
of the source, the flags, the torch and Python versions (`$LFM_KERNELS_CACHE`, default `~/.cache/lfm-kernels`); a
later process finds the built library there and imports it directly, without touching the compiler.

Whenever the kernels cannot be used — `LFM_KERNELS=0`, not an x86-64 CPU with AVX2 + FMA + F16C, no C++ compiler or
ninja, a failed build — `load()` returns None after ONE warning line (none for `LFM_KERNELS=0`), and the quantized
layers keep using PyTorch's own weight-only kernels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCES = [Path(__file__).with_name(f) for f in ("gemv.cpp", "bf16.cpp", "attention.cpp", "dequant.cpp")]
HEADERS = [Path(__file__).with_name("common.h")]
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")


class KernelWarning(RuntimeWarning):
    """The AVX2 kernels are unavailable; PyTorch's kernels are used instead."""


def warn(msg: str) -> None:
    # warn_explicit with a file name linecache cannot resolve: one line, no source line under it
    warnings.warn_explicit(f"{msg}; using PyTorch's weight-only kernels", KernelWarning, "lfm.kernels", 0)


def disabled_by_env() -> bool:
    return os.environ.get("LFM_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supported() -> tuple[bool, str]:
    """Whether this CPU runs AVX2 + FMA + F16C code, and if not, why."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"not an x86-64 CPU ({platform.machine()})"
    flags = cpu_flags()
    if flags:
        missing = [f for f in REQUIRED_CPU_FLAGS if f not in flags]
        return (not missing), f"the CPU lacks {', '.join(missing)}" if missing else ""
    cap = torch.backends.cpu.get_cpu_capability()  # no /proc/cpuinfo: trust ATen's own dispatch level
    return cap in ("AVX2", "AVX512"), f"the CPU's vector capability is {cap}, not AVX2"


def cache_root() -> Path:
    env = os.environ.get("LFM_KERNELS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "lfm-kernels"


def build_key() -> str:
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def _import_built(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx)


def _ninja() -> bool:
    return shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None  # pip's ships one


def compile_and_load(verbose: bool = False) -> ModuleType:
    """Compile (if not cached) and import the extension; raises on any failure."""
    key = build_key()
    name = f"lfm_gemv_{key}"
    build_dir = cache_root() / key
    so = build_dir / f"{name}.so"
    if so.exists():
        try:
            return _import_built(name, so)
        except ImportError:
            pass  # another process is still linking it: build (under torch's lock) below
    if _compiler() is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    if not _ninja():
        raise RuntimeError("ninja is not installed")
    build_dir.mkdir(parents=True, exist_ok=True)
    print("lfm.kernels: compiling the AVX2 GEMV kernels (first use only, about a minute)", file=sys.stderr, flush=True)
    from torch.utils.cpp_extension import load as cpp_load

    return cpp_load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                    build_directory=str(build_dir), verbose=verbose)


def load() -> ModuleType | None:
    """The extension module, or None (with one warning, unless disabled by LFM_KERNELS=0)."""
    if disabled_by_env():
        return None
    ok, why = cpu_supported()
    if not ok:
        warn(f"lfm.kernels: {why}")
        return None
    try:
        return compile_and_load()
    except Exception as e:  # noqa: BLE001 - any build or import failure means: fall back
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warn(f"lfm.kernels: could not build the AVX2 kernels ({first[:200]})")
        return None
