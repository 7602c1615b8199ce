-- Importing Mathlib here makes `lake build` compile (or fetch) everything proofs may import.
import Mathlib
