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
install_desktop_test_deps
build_wasm_skills
cd "$ROOT"
export OPENPISTA_TEST_MODELS_DIR="$MODELS_DIR"
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "==> cargo test"
cargo test --locked --workspace --no-fail-fast
echo "==> no container made by the tests is left"
left="$(curl -sf --unix-socket "$TEST_DOCKER_SOCK" \
    'http://localhost/containers/json?all=1&filters=%7B%22label%22%3A%5B%22openpista.managed%22%5D%7D')"
if [ "$left" != "[]" ]; then
    echo "containers left behind by the tests: $left" >&2
    exit 1
fi
