"""The public, reusable ops. Each has `triton`, `cuda` (where it exists) and `torch` backends behind one function.

Importing this package is cheap: Triton kernels and the CUDA extension load on first use of their backend.
"""

from qlfast.ops.attn_merge import merge_attn_
from qlfast.ops.flash_attention import flash_attention, flash_attn_varlen_bwd, flash_attn_varlen_fwd
from qlfast.ops.linear_logprob import linear_logprob, linear_logprob_with_lse
from qlfast.ops.policy_loss import PolicyLossConfig, policy_loss
from qlfast.ops.shared_prefix import SharedPrefix, shared_prefix_attention

__all__ = ["PolicyLossConfig", "flash_attention", "flash_attn_varlen_bwd", "flash_attn_varlen_fwd", "linear_logprob",
           "linear_logprob_with_lse", "merge_attn_", "policy_loss", "SharedPrefix", "shared_prefix_attention"]
