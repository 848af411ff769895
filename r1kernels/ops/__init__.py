"""torch.library custom ops (schemas, fakes, autograd), one file per op family; loaded by _backend."""
