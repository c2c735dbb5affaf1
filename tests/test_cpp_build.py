"""kernels/cpp_build.py: what the C++ kernels share. Their builds themselves (fresh caches, a missing
compiler, a compiler without OpenMP) are tested with each kernel: test_features.py, test_quantize.py,
test_cpu_attention.py."""

import threading

import pytest
from minaf3.kernels.cpp_build import build_once, failure_reason, load_together, resolve_backend

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
