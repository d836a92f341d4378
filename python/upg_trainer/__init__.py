"""upg_trainer: the reference trainer (SFT, GRPO, HPT) on upg_kernels.unified_policy_loss. CLI: ``upg-train``."""
