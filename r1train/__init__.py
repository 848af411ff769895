"""r1train: GRPO / SFT on a standard DeepSpeed loop with r1kernels' fused losses, rule rewards, the R1
recipe, and a built-in offline task with tiny models (`r1train demo`)."""

__version__ = "0.1.0"
