"""kernels/cpp_build.py: what the C++ kernels share. Their builds themselves (fresh caches, a missing
compiler, a compiler without OpenMP) are tested with each kernel: test_log_mel.py, test_int8_linear.py,
test_cpu_attention.py."""

import ast
import fnmatch
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import minaf3.kernels
import pytest
from minaf3.kernels.cpp_build import (
    AVX2_FLAGS,
    OPENMP_FLAGS,
    build_environment,
    build_once,
    compile_library,
    exclusive_build,
    failure_reason,
    keyed_name,
    load_together,
    local_headers,
    resolve_backend,
)

from minaf3 import ConfigError


def test_build_once_builds_once_even_when_threads_race():
    calls = []
    gate = threading.Event()

    def build() -> bool:
        gate.wait(5)
        calls.append(1)
        return True

    load = build_once(build)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(load())) for _ in range(4)]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join()
    assert answers == [True] * 4 and calls == [1]
    assert load() is True and calls == [1]


def test_load_together_runs_the_loaders_side_by_side_and_keeps_their_order():
    """Each loader waits for the other at a barrier: run one after the other, they would time out."""
    barrier = threading.Barrier(2, timeout=10)

    def loader(answer: bool):
        def load() -> bool:
            barrier.wait()
            return answer

        return load

    assert load_together(loader(True), loader(False)) == [True, False]


def test_failure_reason_picks_the_compiler_s_error_line():
    log = "ninja: build stopped\n/tmp/x.cpp:3:10: fatal error: immintrin.h: No such file\nFAILED: x.o\n"
    assert failure_reason(RuntimeError(log)) == "/tmp/x.cpp:3:10: fatal error: immintrin.h: No such file"
    assert failure_reason(OSError()) == "OSError"


def test_backend_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.setenv("MINAF3_TEST_BACKEND", "torch")
    assert resolve_backend(None, "MINAF3_TEST_BACKEND") == "torch"
    assert resolve_backend("cpp", "MINAF3_TEST_BACKEND") == "cpp"
    monkeypatch.delenv("MINAF3_TEST_BACKEND")
    assert resolve_backend(None, "MINAF3_TEST_BACKEND") == "auto"
    with pytest.raises(ConfigError, match="backend='fast'"):
        resolve_backend("fast", "MINAF3_TEST_BACKEND")
    monkeypatch.setenv("MINAF3_TEST_BACKEND", "gpu")
    with pytest.raises(ConfigError, match="MINAF3_TEST_BACKEND='gpu'"):
        resolve_backend(None, "MINAF3_TEST_BACKEND")


def test_exclusive_build_clears_a_lock_left_by_a_killed_build(tmp_path, caplog):
    """torch's `lock` file without a live holder of our flock is stale: a later build must not wait on it."""
    build_dir = tmp_path / "minaf3_kernel"
    build_dir.mkdir()
    (build_dir / "lock").touch()  # what a build killed mid-way leaves
    with caplog.at_level("WARNING", logger="minaf3.kernels"), exclusive_build(build_dir):
        assert not (build_dir / "lock").exists()
    assert "removing a build lock left by an interrupted build" in caplog.text


def test_exclusive_build_makes_other_builders_wait(tmp_path):
    """While one holder builds, a second waits; it enters only after the first leaves."""
    build_dir, events = tmp_path / "minaf3_kernel", []
    inside = threading.Event()

    def second() -> None:
        inside.wait(5)
        with exclusive_build(build_dir):
            events.append("second in")

    thread = threading.Thread(target=second)
    thread.start()
    with exclusive_build(build_dir):
        inside.set()
        thread.join(0.5)  # blocked on the flock, not done
        events.append("first out")
    thread.join(10)
    assert events == ["first out", "second in"]


STALE_LOCK_BUILD = """
import logging
logging.basicConfig()
from minaf3.kernels import cpu_attention
print(cpu_attention.load_library())
"""


@pytest.mark.slow
def test_a_build_killed_mid_way_does_not_hang_the_next_one(tmp_path):
    """The next process on the machine builds and loads the kernel instead of waiting forever."""
    from minaf3.kernels import cpu_attention

    flags = AVX2_FLAGS + OPENMP_FLAGS, OPENMP_FLAGS
    folder = tmp_path / keyed_name(cpu_attention.EXTENSION_NAME, cpu_attention.SOURCE, *flags)
    folder.mkdir()
    (folder / "lock").touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", STALE_LOCK_BUILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
    assert "removing a build lock left by an interrupted build" in done.stderr


def test_builds_keep_their_flags_whatever_loaded_before(tmp_path, monkeypatch):
    """Two libraries built from the same flag lists in one process link alike, and the lists stay as given.

    torch's load() appends its libraries to the ldflags list it is given: with a shared list the second
    library linked with them twice, so a process's build commands depended on the order its kernels loaded
    in, and the next process, loading in another order, relinked or recompiled them."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    source = tmp_path / "probe.cpp"
    source.write_text("int minaf3_probe() { return 1; }\n")
    cflags, ldflags = ["-O1"], ["-fopenmp"]
    for name in ("minaf3_probe_a", "minaf3_probe_b"):
        compile_library(name, source, cflags, ldflags, "probe")
    assert cflags == ["-O1"] and ldflags == ["-fopenmp"]
    links = [
        next(
            line
            for line in (tmp_path / keyed_name(name, source, cflags, ldflags) / "build.ninja")
            .read_text()
            .splitlines()
            if line.startswith("ldflags")
        )
        for name in ("minaf3_probe_a", "minaf3_probe_b")
    ]
    assert links[0] == links[1] and links[0].count("-ltorch_cpu") == 1


def test_builds_are_keyed_by_source_and_flags_not_by_path(tmp_path, monkeypatch, caplog):
    """The same source from another folder (another checkout) loads the existing build without compiling;
    changed bytes or flags build into a folder of their own, leaving the first build as it was."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    here, there = tmp_path / "here", tmp_path / "there"
    for folder in (here, there):
        folder.mkdir()
        (folder / "probe.cpp").write_text("int minaf3_probe_key() { return 1; }\n")
    compile_library("minaf3_probe_key", here / "probe.cpp", ["-O1"], [], "probe")
    built = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())
    library = next((tmp_path / "cache" / built[0]).glob("*.so"))
    stamp = library.stat().st_mtime_ns
    compile_library("minaf3_probe_key", there / "probe.cpp", ["-O1"], [], "probe")
    assert library.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    (there / "probe.cpp").write_text("int minaf3_probe_key() { return 2; }\n")
    compile_library("minaf3_probe_key", there / "probe.cpp", ["-O1"], [], "probe")
    compile_library("minaf3_probe_key", here / "probe.cpp", ["-O2"], [], "probe")
    folders = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert len(folders) == 3 and built[0] in folders and library.stat().st_mtime_ns == stamp


def test_headers_beside_a_source_are_copied_with_it_and_keyed_with_it(tmp_path, monkeypatch):
    """A source that includes headers beside it (int4_gemv.cpp) builds from copies of them all, and a changed
    header, even one included by another header, builds into a folder of its own, as a changed source does."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    source, outer, inner = tmp_path / "probe.cpp", tmp_path / "outer.h", tmp_path / "inner.h"
    source.write_text('#include <cstdint>\n#include "outer.h"\n#include "inner.h"\n'
                      "int minaf3_probe_header() { return kValue; }\n")  # fmt: skip
    outer.write_text('#pragma once\n#include "inner.h"\n')
    inner.write_text("#pragma once\nconstexpr int kValue = 1;\n")
    assert local_headers(source) == [outer, inner]
    compile_library("minaf3_probe_header", source, ["-O1"], [], "probe")
    first = tmp_path / "cache" / keyed_name("minaf3_probe_header", source, ["-O1"], [])
    assert (first / "inner.h").read_text() == inner.read_text()
    inner.write_text("#pragma once\nconstexpr int kValue = 2;\n")
    second = tmp_path / "cache" / keyed_name("minaf3_probe_header", source, ["-O1"], [])
    assert second != first
    compile_library("minaf3_probe_header", source, ["-O1"], [], "probe")
    assert "kValue = 2" in (second / "inner.h").read_text()
    assert "kValue = 1" in (first / "inner.h").read_text()
    assert list(second.glob("*.so"))


def test_the_package_installs_the_kernels_headers():
    """Every header a kernel includes is package data (setup.py), or an installed (non-editable) minaf3 could
    not build that kernel."""
    setup = ast.parse((Path(__file__).resolve().parent.parent / "setup.py").read_text())
    data = next(
        ast.literal_eval(node.value)
        for node in ast.walk(setup)
        if isinstance(node, ast.keyword) and node.arg == "package_data"
    )
    kernels = Path(minaf3.kernels.__file__).parent
    headers = {h for source in kernels.glob("*.cpp") for h in local_headers(source)}
    assert headers and all(h.exists() for h in headers)
    for header in headers:
        assert any(fnmatch.fnmatch(header.name, pattern) for pattern in data["minaf3.kernels"]), header.name


def test_every_folder_a_build_command_names_is_in_its_key(tmp_path, monkeypatch):
    """ninja rebuilds when a build's command changes, and the command names the torch and Python include
    folders of the environment that ran it: each such folder is part of the key (build_environment), so
    another virtual environment with the same torch builds into a folder of its own instead."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    (tmp_path / "probe.cpp").write_text("int minaf3_probe_env() { return 1; }\n")
    compile_library("minaf3_probe_env", tmp_path / "probe.cpp", ["-O1"], [], "probe")
    folder = tmp_path / "cache" / keyed_name("minaf3_probe_env", tmp_path / "probe.cpp", ["-O1"], [])
    command = (folder / "build.ninja").read_text()
    included = re.findall(r"-isystem (\S+)", command)
    assert included
    folders = [part for part in build_environment() if part.startswith("/")]
    assert all(any(path.startswith(folder) for folder in folders) for path in included)
    import torch

    key = keyed_name("x", tmp_path / "probe.cpp", [], [])
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert keyed_name("x", tmp_path / "probe.cpp", [], []) != key  # another torch installation, another build
