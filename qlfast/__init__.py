"""qlfast: fast long-context reasoning RL (QwenLong-L1) with fused Triton/CUDA kernels.

The reusable surface is `qlfast.ops` (linear_logprob, policy_loss, flash_attention); the trainer is
`torchrun -m qlfast.train`.
"""

__version__ = "0.1.0"
