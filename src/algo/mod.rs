//! Policy-optimisation algorithms (GRPO, DAPO, Dr. GRPO, GSPO, DGPO): advantages and losses.
