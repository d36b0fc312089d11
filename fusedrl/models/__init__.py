"""Models: the packed forward for Hugging Face causal LMs, scalar-head models, the attention hookup."""
