"""r1kernels inside other trainers. Each module imports its peer library only when called:

- r1kernels.integrations.trl: `use_r1kernels(trainer)` for trl.GRPOTrainer (`remove_r1kernels` undoes it);
- r1kernels.integrations.liger: `LigerFusedLinearGRPOLoss` and `triton_grpo_loss` with Liger's signatures;
- r1kernels.integrations.verl: `linear_cross_entropy` with verl's fused-kernel signature.
"""
