"""Build (once) and load the AVX2 GEMV extension.

The extension is compiled at first use with `torch.utils.cpp_extension.load` into a cache directory keyed by a hash
of the source, the flags, the torch and Python versions (`$LFM_KERNELS_CACHE`, default `~/.cache/lfm-kernels`); a
later process finds the built library there and imports it directly, without touching the compiler.

A first build takes about a minute and is never silent: the compile prints its elapsed time, and a process that
finds another one compiling the same build says so (which process, which directory) and how long it has waited.
Builds of one cache directory are serialised by an flock on `lfm.lock` (released by the kernel when a process dies,
so a killed build never blocks later ones); `lfm kernels build` compiles ahead of time.

Whenever the kernels cannot be used — `LFM_KERNELS=0`, not an x86-64 CPU with AVX2 + FMA + F16C, no C++ compiler or
ninja, a failed build — `load()` returns None after ONE warning line (none for `LFM_KERNELS=0`), and the quantized
layers keep using PyTorch's own weight-only kernels.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

SOURCES = [Path(__file__).with_name(f) for f in ("gemv.cpp", "bf16.cpp", "attention.cpp", "dequant.cpp", "decode.cpp",
                                                      "sample.cpp")]
HEADERS = [Path(__file__).with_name(f)
           for f in ("common.h", "gemv_kernels.h", "int8_kernels.h", "int4_prep.h", "int4_kernels.h", "amx_kernels.h",
                     "gemvf_kernels.h", "attention_kernels.h", "attention_i8.h", "bf16_kernels.h", "decode_ops.h",
                     "decode_plan.h")]
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]  # no implicit FMAs: exact
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


def note(msg: str, end: str = "\n") -> None:
    print(msg, file=sys.stderr, end=end, flush=True)


@contextlib.contextmanager
def progress(what: str, every: float = 10.0) -> Iterator[None]:
    """Say `what` now, then the elapsed time while the block runs: one line rewritten each second on a terminal,
    a line every `every` seconds in a log; the total at the end."""
    tty = sys.stderr.isatty()
    t0 = time.monotonic()
    done = threading.Event()
    note(f"lfm.kernels: {what} ...")

    def tick() -> None:
        while not done.wait(1.0 if tty else every):
            elapsed = f"lfm.kernels: {what}: {time.monotonic() - t0:.0f} s"
            note(f"\r{elapsed}" if tty else elapsed, end="" if tty else "\n")

    t = threading.Thread(target=tick, daemon=True, name="lfm-kernels-progress")
    t.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        done.set()
        t.join()
        note(("\r" if tty else "") + f"lfm.kernels: {what}: {'done' if ok else 'failed'} after "
             f"{time.monotonic() - t0:.0f} s")


def _lock_holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def build_lock(build_dir: Path, poll: float = 0.2, every: float = 10.0) -> Iterator[None]:
    """Hold the build directory's lock (`lfm.lock`, flock), waiting for another builder if there is one, and saying
    so: who holds it, where, and for how long we have waited. Without fcntl (Windows) builds are not serialised
    here (torch's own lock file still is)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = build_dir / "lfm.lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            t0 = last = time.monotonic()
            note(f"lfm.kernels: waiting for {_lock_holder(lock)}, which is compiling the kernels in {build_dir} "
                 "(the first build takes about a minute; this process uses its result)")
            while True:
                time.sleep(poll)
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() - last >= every:
                        last = time.monotonic()
                        note(f"lfm.kernels: still waiting for {_lock_holder(lock)} ({last - t0:.0f} s)")
            note(f"lfm.kernels: the other build finished after {time.monotonic() - t0:.0f} s of waiting")
        try:
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clear_stale_torch_lock(build_dir: Path) -> None:
    """torch's cpp_extension waits, silently and forever, while `lock` exists in the build directory; a build killed
    midway leaves it behind. We hold `lfm.lock`, so no other lfm build can be using it: remove it."""
    stale = build_dir / "lock"
    if stale.exists():
        note(f"lfm.kernels: removing {stale}, left by a build that did not finish")
        stale.unlink(missing_ok=True)


def _cpp_load(name: str, build_dir: Path, verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import load as cpp_load

    return cpp_load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                    build_directory=str(build_dir), verbose=verbose)


def built_library() -> Path:
    """Where this source + flags + torch + Python combination's library is (or will be) built."""
    key = build_key()
    return cache_root() / key / f"lfm_gemv_{key}.so"


def compile_and_load(verbose: bool = False) -> ModuleType:
    """Compile (if not cached) and import the extension; raises on any failure."""
    so = built_library()
    name, build_dir = so.stem, so.parent
    if so.exists():
        try:
            return _import_built(name, so)
        except ImportError:
            pass  # another process is still linking it: wait for its lock below
    if _compiler() is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    if not _ninja():
        raise RuntimeError("ninja is not installed")
    build_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(build_dir):
        if so.exists():  # built by the process we waited for
            try:
                return _import_built(name, so)
            except ImportError:
                pass
        _clear_stale_torch_lock(build_dir)
        with progress(f"compiling the AVX2 kernels into {build_dir} (first use only, about a minute)"):
            return _cpp_load(name, build_dir, verbose)


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
