"""llmkit's own CPU kernels for GGUF's Q4_0, Q4_1 and Q8_0 blocks (llmkit/quant/kernels/gguf_cpu.cpp): a layer keeps
the file's block bytes, byte for byte, and multiplies from them directly.

    y = x W^T,  W in blocks of 32 inputs:  Q4_0  w = d (q - 8),  Q4_1  w = d q + m,  Q8_0  w = d q

Each row of x is quantized per block of 32 to int8 (dx = fp16(max|x| / 127), qx = round(x / dx): llama.cpp's Q8_0
activations), so a block's contribution is d dx sum_j q_j qx_j (+ m dx sum_j qx_j for Q4_1): 32 integer products
per block and row, one AVX512-VNNI `vpdpbusd` (or AVX2 `vpmaddubsw` + `vpmaddwd`) per block, the weight block read
once for every row of x (up to 16 rows per call, the decode and speculative-verification sizes). Against aten's int4
kernel (quant/tinygemm.py), which these formats took before: no split of 8-bit codes into two 4-bit halves, no bf16
scale/offset copies (RAM = the file's bytes), activations rounded as llama.cpp rounds them. Measured in
docs/quantization.md.

The C++ source is compiled on first use with the machine's C++ compiler (`torch.utils.cpp_extension.load`,
`-O3 -march=native`; ~15 s once, cached by torch under ~/.cache/torch_extensions). Where that fails (no compiler)
the formats fall back to aten's int4 kernel with a one-line warning; LLMKIT_NATIVE_KERNELS=0 asks for that fallback.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "kernels" / "gguf_cpu.cpp"
KINDS = {"q4_0": 0, "q4_1": 1, "q8_0": 2}  # the kernel's `kind` argument per scheme
MAX_ROWS = 16  # rows of x per call (the kernel's kMaxRows)
FLAGS = ["-O3", "-march=native"]


@functools.cache
def native_kernels_available() -> bool:
    """Whether the GGUF block kernels are built and loaded (building them on the first call)."""
    if os.environ.get("LLMKIT_NATIVE_KERNELS", "1") == "0":
        return False
    from torch.utils.cpp_extension import load

    name = "llmkit_gguf_" + hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
    if not _built_before(name):
        print("llmkit: building its GGUF CPU kernels (once per machine, ~15 s)...", file=sys.stderr, flush=True)
    try:
        load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 (no compiler, a failed build: the fallback path still works)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"llmkit: could not build the GGUF CPU kernels ({reason}); Q4_0/Q4_1/Q8_0 layers use aten's "
                      "int4 kernel instead (install a C++ compiler, e.g. `apt install g++`, for the faster path)",
                      stacklevel=2)
        return False

    @torch.library.register_fake("llmkit_gguf::matmul")
    def _(x: torch.Tensor, blocks: torch.Tensor, kind: int, out_features: int) -> torch.Tensor:  # torch.compile
        return x.new_empty(x.shape[0], out_features)

    return True


def _built_before(name: str) -> bool:
    """Whether torch's extension cache already holds this build (only to decide whether to announce a build)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: absent in some torch version?

        return any(Path(_get_build_directory(name, verbose=False)).glob("*.so"))
    except Exception:  # noqa: BLE001 (then the build message is printed, nothing else changes)
        return False


def gguf_matmul(x: torch.Tensor, blocks: torch.Tensor, scheme: str, out_features: int) -> torch.Tensor:
    """y (rows, out_features) float32 = x (rows, in) W^T for W in `scheme`'s GGUF blocks (out_features, in / 32 *
    block bytes) uint8; at most MAX_ROWS rows, x cast to float32."""
    return torch.ops.llmkit_gguf.matmul(x.float(), blocks, KINDS[scheme], out_features)
