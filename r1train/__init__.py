"""r1train: GRPO / SFT on a standard DeepSpeed loop with r1kernels' fused losses, rule rewards, the R1
recipe, and a built-in offline task with tiny models (`r1train demo`)."""

import os

# Idle OpenMP threads sleep instead of spinning. libgomp reads this when torch loads, so it takes effect for
# `import r1train` before `import torch` (and always for the CLI): on a small shared CPU a spinning runtime
# made the demo ~15x slower whenever another process was busy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
