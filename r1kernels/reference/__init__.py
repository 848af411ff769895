"""Pure-PyTorch reference: the spec every kernel is tested against and the CPU fallback (fp32 math)."""
from .advantage import group_advantages
from .decode_attention import decode_attention
from .decode_linear import decode_linear
from .fused import apply_rotary, rms_norm, silu_mul
from .grpo import grpo_loss, grpo_loss_from_logprobs, linear_grpo_loss
from .logprob import linear_token_logprobs, token_logprobs, token_logprobs_lse
from .moe import permute, route, sequence_aux_loss, unpermute, update_bias
from .sampling import sample_tokens

__all__ = [
    "token_logprobs", "token_logprobs_lse", "linear_token_logprobs", "group_advantages", "grpo_loss",
    "grpo_loss_from_logprobs", "linear_grpo_loss", "route", "permute", "unpermute", "update_bias", "sequence_aux_loss",
    "sample_tokens", "decode_attention", "decode_linear", "rms_norm", "apply_rotary", "silu_mul",
]
