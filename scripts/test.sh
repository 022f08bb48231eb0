#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite: formatting, lints,
# every test (real llama.cpp model, real SQLite, real subprocesses, a private
# dockerd on a unix socket, stopped at exit).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
install_build_deps
fetch_default_model
install_test_python
install_docker
trap stop_test_dockerd EXIT
start_test_dockerd
install_wasm_toolchain
build_wasm_skills
cd "$ROOT"
export OPENPISTA_TEST_MODELS_DIR="$MODELS_DIR"
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "==> cargo test"
cargo test --locked --workspace
