#!/usr/bin/env bash
# The real kimina-lean-server, for the contract test tests/lean_kimina_server.rs.
#
# The PyPI package kimina-ast-server==2.1.3 (MIT) is the kimina-lean-server (a FastAPI app; its
# module is `server`, started with `python -m server run`). This script installs it into a
# virtual environment in the cache, its dependencies pinned by scripts/kimina-constraints.txt,
# and prints that environment's python on stdout:
#   export LEAN_GRPO_KIMINA_PYTHON="$(scripts/fetch-kimina.sh)"
# The test starts the server with it; the server's Lean REPL is replaced by a fake REPL process
# (tests/support/fixture_repl.py), so no Lean, Mathlib or REPL build is needed.
#
# Needs: a Python >= 3.12 (kimina's client models use typing.TypedDict, which pydantic refuses on
# 3.11; $LEAN_GRPO_KIMINA_BASE_PYTHON picks one, else python3.13/python3.12/pyenv's/python3),
# `node` (the server imports a Prisma client, which must be generated once; the generator is the
# npm package prisma, fetched from the npm registry). Prisma's query and schema engines, which the
# generator would download from binaries.prisma.sh (not a package registry), are not fetched:
# they are only used to talk to a database, and the server uses none unless
# LEAN_SERVER_DATABASE_URL is set, so the generator is pointed at an empty stand-in file.
#
# Exit status: 0 with the path printed; 2 when a package registry is unreachable (scripts/test.sh
# then skips the contract test and says so); 3 when no Python >= 3.12 is found; 1 otherwise.
# Cache: $LEAN_GRPO_KIMINA_CACHE, default .cache/kimina in the repository (git-ignored); reused.
set -euo pipefail

version=2.1.3
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LEAN_GRPO_KIMINA_CACHE:-$repo/.cache/kimina}"
venv="$cache/venv"
python="$venv/bin/python"
ready="$venv/.lean-grpo-ready"
constraints="$repo/scripts/kimina-constraints.txt"

log() { echo "fetch-kimina.sh: $*" >&2; }

unreachable() {
    grep -qiE 'network is unreachable|connection (refused|reset|aborted)|name or service not known|temporary failure in name resolution|max retries exceeded|read timed out|getaddrinfo|ENOTFOUND|ECONNREFUSED|ETIMEDOUT|EAI_AGAIN|NewConnectionError' "$1"
}

pick_python() {
    local candidates=()
    [ -n "${LEAN_GRPO_KIMINA_BASE_PYTHON:-}" ] && candidates+=("$LEAN_GRPO_KIMINA_BASE_PYTHON")
    candidates+=(python3.13 python3.12)
    local root="${PYENV_ROOT:-$HOME/.pyenv}"
    for p in "$root"/versions/3.1[2-9]*/bin/python3; do
        [ -x "$p" ] && candidates+=("$p")
    done
    candidates+=(python3)
    for p in "${candidates[@]}"; do
        if "$p" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

if [ ! -f "$ready" ]; then
    if ! base="$(pick_python)"; then
        log "no Python >= 3.12 with the venv module found (kimina-ast-server's models need it;"
        log "set LEAN_GRPO_KIMINA_BASE_PYTHON to one)"
        exit 3
    fi
    log "installing kimina-ast-server==$version from PyPI into $venv (about 500 MB) with $base"
    rm -rf "$venv"
    mkdir -p "$cache"
    "$base" -m venv "$venv" >&2
    out="$(mktemp)"
    trap 'rm -f "$out"' EXIT
    if ! "$python" -m pip install --disable-pip-version-check -c "$constraints" \
        "kimina-ast-server==$version" >"$out" 2>&1; then
        cat "$out" >&2
        if unreachable "$out"; then
            log "the package registry (PyPI) is unreachable"
            exit 2
        fi
        log "pip install kimina-ast-server==$version failed"
        exit 1
    fi
    # Generate the Prisma client the server imports (see above): the prisma CLI from npm goes to
    # the cache, the engines are an empty stand-in.
    if ! command -v node >/dev/null; then
        log "node is not installed; the Prisma client kimina-ast-server imports cannot be generated"
        exit 1
    fi
    : >"$cache/no-prisma-engine"
    schema="$("$python" -c 'import pathlib, server; print(pathlib.Path(server.__file__).parent / "prisma/schema.prisma")')"
    if ! (cd "$cache" && PATH="$venv/bin:$PATH" PRISMA_HOME_DIR="$cache/prisma" \
        PRISMA_QUERY_ENGINE_BINARY="$cache/no-prisma-engine" \
        PRISMA_SCHEMA_ENGINE_BINARY="$cache/no-prisma-engine" \
        PRISMA_ENGINES_CHECKSUM_IGNORE_MISSING=1 PRISMA_PY_GENERATE_SKIP_WARNING=1 \
        "$python" -m prisma generate --schema "$schema") >"$out" 2>&1; then
        cat "$out" >&2
        if unreachable "$out"; then
            log "the npm registry (for the prisma CLI) is unreachable"
            exit 2
        fi
        log "prisma generate failed"
        exit 1
    fi
    touch "$ready"
fi

# Smoke test: the app imports (its settings validated against no workspace) and has its routes.
if ! smoke="$(cd "$cache" && LEAN_SERVER_SKIP_VALIDATION=1 "$python" -c '
from server.main import app
missing = {"/api/check", "/health"} - set(app.openapi()["paths"])
assert not missing, missing
print("ok")' 2>&1)" || [[ "$smoke" != *ok ]]; then
    log "kimina-ast-server in $venv does not import; delete $venv and retry:"
    echo "$smoke" >&2
    exit 1
fi
echo "$python"
