"""The first kernel build is never silent: waiting on another builder says who and for how long, a stale torch lock
left by a killed build is cleared, the compile shows elapsed time; `lfm kernels build` builds ahead of time."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types

import pytest

from lfm.kernels import build

fcntl = pytest.importorskip("fcntl")


def test_waiting_for_another_builder_says_who_and_how_long(tmp_path, capsys):
    lock = tmp_path / "lfm.lock"
    with open(lock, "a+") as held:  # another process's build: its flock, and its pid in the file
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("12345")
        held.flush()
        got = threading.Event()

        def builder() -> None:
            with build.build_lock(tmp_path, poll=0.02, every=0.1):
                got.set()

        t = threading.Thread(target=builder)
        t.start()
        time.sleep(0.5)
        assert not got.is_set()  # it waits ...
        err = capsys.readouterr().err
        assert f"waiting for process 12345, which is compiling the kernels in {tmp_path}" in err
        assert "still waiting for process 12345" in err  # ... and keeps saying so
        fcntl.flock(held, fcntl.LOCK_UN)
    t.join(10)
    assert got.is_set()
    assert "the other build finished" in capsys.readouterr().err
    assert lock.read_text() == str(os.getpid())  # the new holder's pid, for the next waiter's message


def test_progress_shows_elapsed_time(capsys):
    with build.progress("compiling X", every=0.1):
        time.sleep(0.45)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "lfm.kernels: compiling X ..."
    assert sum(ln.startswith("lfm.kernels: compiling X: ") and ln.endswith(" s") for ln in lines) >= 2
    assert lines[-1].startswith("lfm.kernels: compiling X: done after")


def test_compile_clears_a_stale_torch_lock_and_reports(tmp_path, monkeypatch, capsys):
    """torch's cpp_extension waits forever while `lock` exists; a build killed midway leaves it behind."""
    monkeypatch.setenv("LFM_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(build, "_ninja", lambda: True)
    so = build.built_library()
    so.parent.mkdir(parents=True)
    (so.parent / "lock").write_text("")  # left by a killed build
    calls = []

    def fake_cpp_load(name, build_dir, verbose):
        calls.append((name, build_dir))
        assert not (build_dir / "lock").exists()  # cleared before torch looks for it
        return types.ModuleType(name)

    monkeypatch.setattr(build, "_cpp_load", fake_cpp_load)
    mod = build.compile_and_load()
    assert mod.__name__ == so.stem and calls == [(so.stem, so.parent)]
    err = capsys.readouterr().err
    assert "left by a build that did not finish" in err and "compiling the AVX2 kernels into" in err
    assert "done after" in err


def lfm(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_kernels_build_disabled_is_one_line():
    p = lfm("kernels", "build", LFM_KERNELS="0")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "lfm: error: the kernels are disabled by LFM_KERNELS=0 in this environment; unset it to build them"]


@pytest.mark.skipif(not build.cpu_supported()[0], reason="the AVX2 kernels do not run on this CPU")
def test_kernels_build_builds_or_finds_them():
    p = lfm("kernels", "build")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"AVX2 kernels ready: {build.built_library()}")
    again = lfm("kernels", "build")
    assert "(already built)" in again.stdout
