"""Building the C++ kernels: what log_mel.py and int8_linear.py share.

    build_once(build)              a thread-safe `load_extension`: calls build() once per process
    compile_library(name, ...)     torch.utils.cpp_extension.load with ninja, saying so when it compiles
    keyed_name(name, source, ...)  the build's folder: one per source, flags and build environment
    local_headers(source)          the headers beside a source that it includes (#include "name.h")
    build_openmp_library(...)      the same for an AVX2 operator library, with OpenMP when the compiler has it
    load_together(*loaders)        several kernels' load_extension at once: first builds run side by side
    exclusive_build(build_dir)     one process builds a library at a time; clears a killed build's lock
    failure_reason(error)          the line of a failed build's log that says why
    resolve_backend(...)           "auto" | "cpp" | "torch" from an argument or an environment variable

A kernel is compiled on first use, into torch's extension cache ($TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), in a folder of its own for each source (with the headers beside it that it
includes), flags and build environment (the torch installation and Python: keyed_name), and loaded from
there afterwards: two checkouts with one environment share a build, and two environments never replace each
other's. Compiling takes about 10 s on two cores, so a process that compiles logs a line saying so rather
than stall in silence.
A failed build is never fatal: each kernel keeps a torch path and logs one warning naming the cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from minaf3.errors import ConfigError

logger = logging.getLogger("minaf3.kernels")

BACKENDS = ("auto", "cpp", "torch")
# What a failed cpp_extension.load raises: a compiler or ninja error, a missing tool, an unloadable library.
BUILD_ERRORS = (OSError, RuntimeError, ImportError, subprocess.SubprocessError)
NOTICE_SECONDS = 1.0


def build_once(build: Callable[[], bool]) -> Callable[[], bool]:
    """load_extension for one kernel: the first call runs build() (True when the kernel is ready), under a
    lock, since two threads' first calls must not both compile and register the operator; later calls
    return its answer."""
    lock, answer = threading.Lock(), []

    def load_extension() -> bool:
        if not answer:
            with lock:
                if not answer:
                    answer.append(build())
        return answer[0]

    load_extension.__doc__ = build.__doc__
    return load_extension


def load_together(*loaders: Callable[[], bool]) -> list[bool]:
    """Call each kernel's load_extension on a thread of its own and wait for all; their answers in order.

    A first build is one compiler process (~10 s) and a cached one a quick load, so on a machine's first
    use two kernels built side by side take the time of one on a 2-core machine. Each loader is
    build_once's, so a loader already done returns at once and one in progress elsewhere is waited for.
    """
    answers: list[bool] = [False] * len(loaders)

    def run(i: int) -> None:
        answers[i] = loaders[i]()

    threads = [
        threading.Thread(target=run, args=(i,), name=f"minaf3-kernel-{i}") for i in range(len(loaders))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def _ninja_on_path() -> None:
    """Make a `ninja` installed in this Python's environment visible to torch's build.

    pip installs ninja's binary beside the interpreter (venv/bin); CI often runs venv/bin/python without
    activating the venv, so that folder is not on PATH and torch would report ninja missing.
    """
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def compile_library(name: str, source: Path, cflags: list[str], ldflags: list[str], what: str) -> None:
    """Build (or reload) `source` as the operator library `name`; raises one of BUILD_ERRORS on failure.

    Reloading a cached build takes a fraction of a second; a load still running after NOTICE_SECONDS is
    compiling, and logs one line saying so.
    """
    _ninja_on_path()
    from torch.utils import cpp_extension

    notice = threading.Timer(
        NOTICE_SECONDS,
        logger.warning,
        ("%s: compiling %s (once per source, flags and environment; about 10 s)", what, source.name),
    )
    notice.daemon = True
    notice.start()
    # A build of its own for each combination of what it depends on (keyed_name): two checkouts or two
    # environments on one machine then never rebuild each other's kernels, as they would sharing one folder.
    # The folder is where torch itself would put such a build ($TORCH_EXTENSIONS_DIR/name, or its
    # per-Python default), so that the lock below sits beside the build it guards.
    keyed = keyed_name(name, source, cflags, ldflags)
    build_dir = Path(cpp_extension._get_build_directory(keyed, verbose=False))
    try:
        with exclusive_build(build_dir):
            # Compiled from a copy inside the build folder: the compiler's command names the source's path,
            # and a command that differs (another checkout's path) makes ninja rebuild.
            for original in (source, *local_headers(source)):
                copy = build_dir / original.name
                if not copy.exists() or copy.read_bytes() != original.read_bytes():
                    shutil.copyfile(original, copy)
            copy = build_dir / source.name
            cpp_extension.load(
                name=keyed,
                sources=[str(copy)],
                # Copies: load() appends torch's libraries to extra_ldflags in place. Given a shared list,
                # each later library of the process linked with them twice, thrice..., so its build command
                # changed with the load order and every process relinked or even recompiled the kernels.
                extra_cflags=list(cflags),
                extra_ldflags=list(ldflags),
                build_directory=str(build_dir),
                is_python_module=False,
            )
    finally:
        notice.cancel()


def keyed_name(name: str, source: Path, cflags: list[str], ldflags: list[str]) -> str:
    """`name` and 16 hex digits naming what its build depends on: the bytes of the source and of the headers
    it includes (local_headers), the flags and the build environment (build_environment)."""
    digest = hashlib.sha256(source.read_bytes())
    for header in local_headers(source):
        digest.update(header.name.encode() + b"\0" + header.read_bytes())
    for part in (cflags, ldflags, build_environment()):
        digest.update(repr(part).encode())
    return f"{name}_{digest.hexdigest()[:16]}"


def local_headers(source: Path) -> list[Path]:
    """The files beside `source` that it or they include by `#include "name"`, each once, in the order met.

    They are copied with the source into its build folder and keyed with it. Only names without a folder
    are taken: a kernel's headers sit beside it; ATen's and the system's come in with <...>.
    """
    found: list[Path] = []
    pending = [source]
    while pending:
        for line in pending.pop(0).read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "#include" and words[1].startswith('"'):
                header = source.parent / words[1].strip('"')
                if header not in found:
                    found.append(header)
                    pending.append(header)
    return found


def build_environment() -> list[str]:
    """What a build command takes from the environment: torch's version, the C++ ABI of its headers and the
    folder they are installed in, and Python's version and include folder. The folders are part of the
    command (-isystem ...), and ninja rebuilds when a command changes: two virtual environments with the
    same torch sharing one build would rebuild it each time they alternate."""
    import torch

    torch_folder = os.path.dirname(os.path.abspath(torch.__file__))  # as cpp_extension finds it
    abi = str(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [torch.__version__, abi, torch_folder, sys.version, sysconfig.get_paths()["include"]]


@contextlib.contextmanager
def exclusive_build(build_dir: Path) -> Iterator[None]:
    """Hold the build in `build_dir` against other processes, and clear a build lock left behind.

    torch's cpp_extension marks a build in progress with a `lock` file in the build folder, and every other
    process waits until that file is gone. A process killed mid-build (Ctrl-C during a first use, a
    timeout) leaves it behind, and every later load on the machine then waits forever without a word. An
    flock on a file beside the folder is released by the kernel when its holder dies, so whoever holds it
    knows that no build is running: a `lock` file it finds is stale, and is removed with a warning.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.with_name(build_dir.name + ".minaf3-lock"), "a") as handle:
        if fcntl is None:  # not POSIX: torch's own lock only
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        stale = build_dir / "lock"
        if stale.exists():
            logger.warning("%s: removing a build lock left by an interrupted build", build_dir.name)
            stale.unlink(missing_ok=True)
        yield


# at::parallel_for is a header template that runs its body serially unless the library itself is compiled
# with OpenMP (the first int8 kernel, built without it, used one core whatever torch.set_num_threads said).
# Linking with it names libgomp.so.1, which resolves to the copy torch has already loaded, so the kernels
# share torch's thread pool.
OPENMP_FLAGS = ["-fopenmp"]
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma"]


def build_openmp_library(name: str, source: Path, what: str) -> bool:
    """Build (first time) and load the AVX2 operator library `source`; True when its operators are ready.

    False, with one logged warning that says why and that torch's ops run instead, when this CPU lacks AVX2
    or the build fails (no C++ compiler, no ninja, missing torch headers). A compiler without OpenMP gets a
    one-thread build, with a warning.
    """
    import torch

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        logger.warning("%s: this CPU has no AVX2; using torch's ops instead (slower decode)", what)
        return False
    try:
        compile_library(name, source, AVX2_FLAGS + OPENMP_FLAGS, OPENMP_FLAGS, what)
    except BUILD_ERRORS as e:
        reason = failure_reason(e)
        try:
            compile_library(name, source, AVX2_FLAGS, [], what)
        except BUILD_ERRORS:
            logger.warning(
                "%s: building %s failed (%s); using torch's ops instead (slower decode). Install a C++ "
                "compiler and ninja to enable it.",
                what,
                source.name,
                reason,
            )
            return False
        logger.warning("%s: built without OpenMP (%s); it runs on one thread", what, reason)
    return True


def failure_reason(error: BaseException) -> str:
    """The line of a failed build's log that says why (the compiler's error), not ninja's summary."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "error" in line.lower() or "not found" in line.lower()]
    return (telling or lines or [type(error).__name__])[-1][:300]


def resolve_backend(backend: str | None, env: str) -> str:
    """The backend a call will use: the argument, else the environment variable `env`, else "auto"."""
    chosen = backend if backend is not None else os.environ.get(env, "auto")
    if chosen not in BACKENDS:
        source = "backend" if backend is not None else env
        raise ConfigError(f"{source}={chosen!r}: expected one of {list(BACKENDS)}")
    return chosen
