#!/usr/bin/env bash
# Installs what openpista needs (Debian packages, the default local model),
# builds it, and answers one prompt on the local model with no API key.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
install_build_deps
fetch_default_model
install_wasm_toolchain
build_wasm_skills
cd "$ROOT"
echo "==> building openpista (release; the first build compiles llama.cpp and takes a while)"
cargo build --release --locked -p openpista-cli
BIN="$CARGO_TARGET_DIR/release/openpista"
"$BIN" init >/dev/null
echo "==> openpista run -e \"${1:-What is the capital of France?}\""
"$BIN" run -e "${1:-What is the capital of France?}"
echo "==> the binary is $BIN (try: $BIN repl)"
