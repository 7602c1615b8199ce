//! The RL loop, metrics, checkpoints and resume.
