"""Load a GGUF file with its matrices still quantized: each weight becomes a QuantLinear holding the file's own
blocks, so the model's RAM is about the file's size instead of 4 bytes per weight (checkpoints/gguf.py's
`load_gguf` dequantizes every tensor to float).

    GGUF type            held as                          computed (1-16 rows on CPU; more: dequantize, F.linear)
    Q4_0, Q4_1, Q8_0,    the file's block bytes           llmkit's kernels (quant/native.py): x rounded to int8
    Q5_0, Q5_1, Q4_K,                                     per block of 32 as llama.cpp does; the LM head (Q8_0)
    Q5_K, Q6_K                                            with float32 x
    F16, BF16            the half matrix                  llmkit's float kernel (x in float32)
    F32 (and 1-D)        float tensors in `dtype`         F.linear (column-major fp32 decode path)

Without a C++ compiler (the kernels build on first use) the 4- and 5-bit types and Q8_0 run through aten's int4
kernel (quant/tinygemm.py: codes in its layout, 5- and 8-bit codes as two 4-bit pieces, bf16 copies of the scales:
1-2 more bits per weight), F16/BF16 through F.linear in the half type, and Q6_K dequantizes per call.
No value is dequantized and requantized: the block bytes ARE llmkit's formats of the same names (gguf_blocks.py,
gguf_types.py), and `QuantLinear.packed` gives back the file's bytes exactly (tested).
llama.cpp's Q/K row interleaving is undone on the rows of bytes (`permuted_heads`): the blocks of a row lie within
that row, so moving whole rows is exact for any block format. The token embedding stays packed too
(`QuantEmbedding`, which dequantizes only the looked-up rows); when the LM head is tied to it (SmolLM2's Q8_0 table)
both share one QuantLinear.
Types with no path here (IQ*, TQ*, Q2_K, Q3_K, MXFP4, ...) raise naming the tensor and its type.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as GGML

from llmkit.checkpoints.gguf import (
    checked_tensors,
    config_from_gguf,
    dequantized_tensor,
    numpy_shape,
    open_gguf,
    permuted_heads,
    unpermute_rows,
)
from llmkit.device import resolve_device, resolve_dtype
from llmkit.errors import LlmkitError
from llmkit.gguf_file import GgufFile, GgufTensor
from llmkit.memory import release_freed_memory
from llmkit.models.decoder import Decoder
from llmkit.nn.linear import use_column_major_weights
from llmkit.quant.embedding import QuantEmbedding
from llmkit.quant.linear import QuantLinear
from llmkit.quant.packed import QuantizedWeight

# GGUF type -> (llmkit scheme, weights per block; None: one value per element)
TYPE_SCHEMES: dict[GGML, tuple[str, int | None]] = {
    GGML.Q8_0: ("q8_0", 32), GGML.Q4_0: ("q4_0", 32), GGML.Q4_1: ("q4_1", 32),
    GGML.Q5_0: ("q5_0", 32), GGML.Q5_1: ("q5_1", 32),
    GGML.Q4_K: ("q4_k", 256), GGML.Q5_K: ("q5_k", 256), GGML.Q6_K: ("q6_k", 256),
    GGML.F16: ("f16", None), GGML.BF16: ("bf16", None),
}
FLOAT_TYPES = (GGML.F32,)
RUNNABLE = ", ".join(["F32", *(t.name for t in TYPE_SCHEMES)])
EMBED, HEAD = "embed.weight", "lm_head.weight"


def is_quantized_gguf(path: str | Path) -> bool:
    """Whether a .gguf file stores any matrix in a type other than F32 (so loading it quantized saves memory)."""
    reader = open_gguf(path)
    return any(t.tensor_type not in FLOAT_TYPES and len(t.shape) == 2 for t in reader.tensors)


def tensor_type_counts(source: str | Path | GgufFile) -> dict[str, tuple[int, int]]:
    """GGUF type name -> (number of tensors, bytes in the file), for `llmkit info` (a file already open is reused)."""
    reader = source if isinstance(source, GgufFile) else open_gguf(source)
    counts, sizes = Counter(), Counter()
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] += 1
        sizes[tensor.tensor_type.name] += int(tensor.n_bytes)
    return {name: (counts[name], sizes[name]) for name in sorted(counts, key=lambda n: -sizes[n])}


def _packed_weight(source: Path, tensor: GgufTensor, heads: int | None) -> QuantizedWeight:
    """The file's bytes of a 2-D tensor as a QuantizedWeight (rows un-interleaved when `heads` is given); copied out
    of the memory map, so the file can be closed."""
    if tensor.tensor_type not in TYPE_SCHEMES:
        raise LlmkitError(f"{source}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which llmkit cannot "
                          f"run; re-quantize the model to one of {RUNNABLE} (e.g. llama.cpp's llama-quantize "
                          "... Q4_K_M)")
    scheme, block = TYPE_SCHEMES[tensor.tensor_type]
    shape = numpy_shape(tensor)
    data = np.asarray(tensor.data)
    if tensor.tensor_type == GGML.BF16:  # the reader hands bf16 out as raw bytes
        data = data.view(np.uint16)
    data = data.reshape(shape[0], -1)  # one row of blocks (or values) per output row
    if heads is not None:
        data = unpermute_rows(data, heads)
    values = torch.from_numpy(np.array(data, copy=True))
    if tensor.tensor_type == GGML.BF16:
        values = values.view(torch.bfloat16)
    return QuantizedWeight(scheme, shape, block, {"weight" if block is None else "blocks": values})


def load_gguf_quantized(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> Decoder:
    """A GGUF file as a ready-to-run Decoder (eval mode) whose quantized matrices stay packed (see the module
    docstring); float tensors (norms, biases, F32 matrices) and the activations in `dtype`."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    reader = open_gguf(path)
    source, config = Path(path), config_from_gguf(reader)
    packed: dict[str, QuantizedWeight] = {}
    floats: dict[str, torch.Tensor] = {}
    for name, tensor in checked_tensors(reader, config):
        heads = permuted_heads(reader, config, name)
        if len(tensor.shape) == 2 and tensor.tensor_type not in FLOAT_TYPES:
            packed[name] = _packed_weight(source, tensor, heads)
            continue
        values = dequantized_tensor(reader, tensor)
        if heads is not None:
            values = unpermute_rows(values, heads)
        floats[name] = torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype)  # a copy: not the memory map
    del reader, tensor

    with torch.device("meta"):
        model = Decoder(config)
    for name in [name for name in packed if name != EMBED]:
        weight = packed.pop(name)  # let go as each layer is built (an F16 layer keeps a column-major copy)
        module = name.removesuffix(".weight")
        parent, _, attribute = module.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute,
                QuantLinear(weight, floats.pop(f"{module}.bias", None), int8_activations=name != HEAD))
    if EMBED in packed:
        table = QuantLinear(packed[EMBED], int8_activations=not config.tie_embeddings)  # a tied table is the head
        model.embed = QuantEmbedding(table, dtype)
        if config.tie_embeddings:
            model.lm_head = table  # one set of packed bytes for the lookup and the head
    model.load_state_dict(floats, strict=False, assign=True)
    model.reset_position_buffers()
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LlmkitError(f"{source}: the model has no value for {left[:4]} after loading; this GGUF layout is not "
                          "supported quantized: load it with llmkit.checkpoints.load_model (dequantized)")
    use_column_major_weights(model)  # F32 matrices take the thread-parallel decode path, as in load_model
    model = model.to(device).eval()
    del packed, floats
    release_freed_memory()  # the header's ~1M parsed objects (vocabulary) and the layout temporaries sat between
    return model  # the weights: without a trim their freed pages stay resident


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (shared tensors once): its weights' RAM."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
