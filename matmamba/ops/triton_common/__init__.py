"""Triton pieces shared by several ops, and fused compositions of them (CUDA; hand-written
backward). ``mixer.mamba2_mixer_core_triton``: conv1d + SSD scan + gated RMSNorm from the in_proj
output of a MatMamba2 block, as one autograd node."""
