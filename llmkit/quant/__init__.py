"""Quantisation: store weights in fewer bits and compute with them dequantised. `nf4` holds the 4-bit
NormalFloat format and the frozen NF4 linear layer that QLoRA (Dettmers et al. 2023) fine-tunes on top of."""
