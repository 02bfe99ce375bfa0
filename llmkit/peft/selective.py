"""Selective fine-tuning: train a chosen subset of the model's own parameters and freeze the rest.

  bitfit       only the bias terms (Ben Zaken et al. 2022, "BitFit"): about 0.1% of the parameters. Llama-style
               models have no biases, so BitFit has nothing to train there (an error says so).
  last_blocks  the last n_blocks transformer blocks and the final norm: the layers closest to the output adapt,
               the early feature extractors stay as pretrained.
  modules      parameters under the named modules (glob patterns such as 'blocks.*.mlp' or 'blocks.*.attn.q_proj').
  full         everything (full fine-tuning, the baseline the other methods are measured against).

Nothing is added, so there is nothing to merge: the trained model is a plain model, and an adapter is just the
trained tensors (`core.save_adapter`).
"""

from __future__ import annotations

from torch import nn

from llmkit.errors import LlmkitError
from llmkit.peft.core import freeze, unfreeze
from llmkit.peft.settings import SELECTIVE_MODES, SelectiveMode, SelectiveSettings  # noqa: F401 (re-exported)

MODES = SELECTIVE_MODES
BIAS_SUFFIX = "bias"
FINAL_NORM = "final_norm"


def apply_selective(model: nn.Module, settings: SelectiveSettings) -> nn.Module:
    """Freeze the model, then unfreeze exactly the parameters `settings.mode` selects (in place); returns the model."""
    freeze(model)
    if settings.mode == "full":
        unfreeze(model)
    elif settings.mode == "bitfit":
        biases = [name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] == BIAS_SUFFIX]
        if not biases:
            name = getattr(getattr(model, "config", None), "name", type(model).__name__)
            raise LlmkitError(f"BitFit trains only bias terms and {name} has none (Llama-style models are bias-free); "
                              "choose mode 'last_blocks' or 'modules', or LoRA")
        unfreeze(model, biases)
    elif settings.mode == "last_blocks":
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise LlmkitError(f"mode 'last_blocks' needs a model with a `blocks` list (a Decoder); "
                              f"{type(model).__name__} has none: use mode 'modules' with patterns instead")
        if settings.n_blocks > len(blocks):
            raise LlmkitError(f"n_blocks={settings.n_blocks} but the model has {len(blocks)} blocks; pass at most "
                              f"{len(blocks)} (or mode 'full')")
        first = len(blocks) - settings.n_blocks
        patterns = [f"blocks.{i}.*" for i in range(first, len(blocks))]
        if getattr(model, FINAL_NORM, None) is not None:
            patterns.append(f"{FINAL_NORM}.*")
        unfreeze(model, patterns)
    else:
        # a pattern names a parameter ('blocks.0.attn.q_proj.weight') or a module whose parameters all train
        unfreeze(model, [*settings.patterns, *(f"{pattern}.*" for pattern in settings.patterns)])
    return model
