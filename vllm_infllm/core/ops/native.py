"""Build, cache and load the native CPU kernels (`csrc/cpu/`, a torch C++ extension).

    python -m vllm_infllm.core.ops.native build    # what scripts/setup.sh runs (seconds when cached)

`VLLM_INFLLM_CPU_KERNEL` picks the CPU ops:
    auto (default)  the native kernels; if they cannot be built or loaded, one logged warning that
                    says why and the fix, then the torch ops
    native          the native kernels, or an error that says why
    torch           the torch ops (`torch_ops`), the reference the native path is tested against

The build uses torch's own extension builder (ninja and the system C++ compiler) with -O3, OpenMP
(at::parallel_for), and -march=native where the compiler accepts it: the loops over the head
dim are written for the compiler to vectorise with whatever the machine has (AVX2/FMA, AVX-512);
without -march the same code builds for the baseline ISA. The build directory is keyed by the
sources, the flags, torch, Python and (with -march=native) the CPU model and flags, so a change
to any of them builds afresh; a cached build loads in well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger("vllm.infllm")  # under vLLM's handler when it runs in vLLM

ENV = "VLLM_INFLLM_CPU_KERNEL"
MODES = ("auto", "native", "torch")
SOURCES = ("attend.cpp", "select.cpp", "bindings.cpp", "ops.h", "simd.h", "store.h")
#: csrc/cpu of this checkout (the package is installed editable by scripts/setup.sh).
CSRC = Path(__file__).resolve().parents[3] / "csrc" / "cpu"


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here (the message says why and the fix)."""


def mode() -> str:
    raw = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if raw not in MODES:
        raise ValueError(f"{ENV}={raw!r} is not one of {', '.join(MODES)} (e.g. {ENV}=torch for the torch ops)")
    return raw


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


@functools.cache
def _march_native() -> bool:
    """Whether the compiler accepts -march=native (not every compiler or CPU does)."""
    try:
        res = subprocess.run([_compiler(), "-march=native", "-x", "c++", "-E", "-"], input="", capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def cflags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    if _march_native():
        flags.append("-march=native")
    return flags


def _key() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(cflags()).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    if "-march=native" in cflags():
        h.update(_cpu_identity().encode())
    return h.hexdigest()[:16]


def build_dir(key: str) -> Path:
    """VLLM_INFLLM_BUILD_DIR, else build/native/<key> of this checkout (git-ignored), else the
    user's cache when the checkout is read-only."""
    env = os.environ.get("VLLM_INFLLM_BUILD_DIR")
    if env:
        return Path(env) / key
    root = CSRC.parents[1] / "build" / "native"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root)
        probe.close()
        return root / key
    except OSError:
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-infllm" / "native" / key


def _build() -> ModuleType:
    missing = [name for name in SOURCES if not (CSRC / name).is_file()]
    if missing:
        raise NativeUnavailable(
            f"the native CPU kernels' sources are not in {CSRC} (missing {', '.join(missing)}): install "
            f"vllm-infllm from its checkout (pip install -e .), or set {ENV}=torch"
        )
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise NativeUnavailable(
            f"ninja is not installed, and the native CPU kernels are built with it: pip install ninja "
            f"(or apt install ninja-build), or set {ENV}=torch"
        ) from None
    key = _key()
    where = build_dir(key)
    where.mkdir(parents=True, exist_ok=True)
    built = any(where.glob("*.so"))
    t0 = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=f"vllm_infllm_cpu_{key}",
            sources=[str(CSRC / name) for name in SOURCES if name.endswith(".cpp")],
            build_directory=str(where),
            extra_cflags=cflags(),
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[sysconfig.get_paths()["include"]],
            verbose=False,
        )
    except Exception as e:  # a compiler error, no compiler, a link error
        raise NativeUnavailable(
            f"building the native CPU kernels in {where} failed ({type(e).__name__}: {str(e)[-800:]}); "
            f"they need a C++17 compiler ({_compiler()}, or set CXX) and ninja. Set {ENV}=torch to use "
            "the torch ops"
        ) from e
    if not built:
        logger.info("infllm: built the native CPU kernels in %.0f s (%s; %s)", time.perf_counter() - t0, where,
                    " ".join(cflags()))
    return module


_loaded: ModuleType | None = None
_failure: NativeUnavailable | None = None


def load() -> ModuleType:
    """The native extension, built first if needed (once per process). Raises NativeUnavailable."""
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    if _failure is not None:
        raise _failure
    try:
        _loaded = _build()
    except NativeUnavailable as e:
        _failure = e
        raise
    return _loaded


_warned = False


def available() -> bool:
    """Whether the CPU path runs the native kernels, by `VLLM_INFLLM_CPU_KERNEL` (see above).
    auto: a build failure is logged once, with the reason, and the torch ops run."""
    global _warned
    m = mode()
    if m == "torch":
        return False
    if m == "native":
        load()
        return True
    try:
        load()
        return True
    except NativeUnavailable as e:
        if not _warned:
            _warned = True
            logger.warning("infllm: using the torch CPU ops, slower than the native kernels: %s. Set %s=torch to "
                           "choose them and silence this.", e, ENV)
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["build"]:
        print("usage: python -m vllm_infllm.core.ops.native build", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        load()
    except NativeUnavailable as e:
        print(f"[native] not built: {e}", file=sys.stderr)
        return 1
    print(f"[native] CPU kernels ready in {build_dir(_key())} ({time.perf_counter() - t0:.1f} s; "
          f"{' '.join(cflags())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
