//! Configuration: defaults < file < flags.
