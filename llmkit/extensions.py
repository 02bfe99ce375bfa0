"""llmkit's C++ kernels as torch ops: each set of sources is compiled once per machine with the machine's C++
compiler (`torch.utils.cpp_extension.load`, cached by torch under ~/.cache/torch_extensions, keyed by the sources'
hash and the flags) and loaded into the process, where its ops appear under `torch.ops.<namespace>`.

The kernels' users (llmkit/nn/decode_kernels.py, llmkit/quant/native.py) keep a pure-PyTorch path beside every
op, so a machine without a compiler still runs, only slower.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

# -fopenmp: at::parallel_for is a header template over OpenMP pragmas; without it the kernels run on one thread
FLAGS = ["-O3", "-march=native", "-fopenmp"]
SHARED_HEADER = Path(__file__).parent / "kernels" / "llmkit_ops.h"  # what every op file includes: namespace, shapes


def build_ops(ops: str, sources: Sequence[Path], headers: Sequence[Path] = (), flags: Sequence[str] = FLAGS,
              what: str = "kernels") -> None:
    """Compile `sources` (including `headers` and SHARED_HEADER, which are hashed with them) and load them; their
    TORCH_LIBRARY registers namespace `ops` (passed to the compiler as the macro LLMKIT_OPS). Announces a first
    build on stderr (`what` names it); raises what the build raises."""
    from torch.utils.cpp_extension import load

    headers = [*headers, SHARED_HEADER]
    source_bytes = b"".join(Path(path).read_bytes() for path in [*sources, *headers])
    name = f"{ops}_" + hashlib.sha256(source_bytes + " ".join(flags).encode()).hexdigest()[:12]
    if not _built_before(name):
        print(f"llmkit: building its {what} (once per machine, ~30 s)...", file=sys.stderr, flush=True)
    include_paths = sorted({str(Path(path).parent) for path in [*sources, *headers]})
    load(name=name, sources=[str(path) for path in sources], extra_cflags=[*flags, f"-DLLMKIT_OPS={ops}"],
         extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [], extra_include_paths=include_paths,
         is_python_module=False, verbose=False)


def try_build_ops(ops: str, sources: Sequence[Path], headers: Sequence[Path] = (), what: str = "kernels",
                  fallback: str = "PyTorch's ops") -> bool:
    """`build_ops` where it can be done: False, after a one-line warning naming `fallback` (what runs instead), when
    the build fails (no compiler), and False without a build when LLMKIT_NATIVE_KERNELS=0 asks for the fallback."""
    if os.environ.get("LLMKIT_NATIVE_KERNELS", "1") == "0":
        return False
    try:
        build_ops(ops, sources, headers, what=what)
    except Exception as error:  # noqa: BLE001 (no compiler, a failed build: the fallback paths still work)
        warnings.warn(f"llmkit: could not build its {what} ({build_failure(error)}); {fallback} instead (install a "
                      "C++ compiler, e.g. `apt install g++`, for the faster path)", stacklevel=3)
        return False
    return True


def build_failure(error: Exception) -> str:
    """The first line of a failed build's message (the compiler's log follows it), for a one-line warning."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _built_before(name: str) -> bool:
    """Whether torch's extension cache already holds this build (only to decide whether to announce a build)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: absent in some torch version?

        return any(Path(_get_build_directory(name, verbose=False)).glob("*.so"))
    except Exception:  # noqa: BLE001 (then the build message is printed, nothing else changes)
        return False
