#!/usr/bin/env bash
# Regenerates crates/cli/startup-order.txt: every function of the binary that
# `openpista start` runs from exec until it idles, answers a few turns over
# QUIC and stops (recorded with valgrind's callgrind). crates/cli/build.rs
# hands the list to the linker, which places those functions next to each
# other, so an idle daemon maps a few megabytes of code instead of pages
# scattered over the whole 33 MB .text (the kernel maps up to 64 KiB around
# every code page fault). Names that no longer
# exist after a change are skipped by the linker; rerun this after large
# changes and compare with `cargo bench -p openpista-cli --bench daemon`.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
install_build_deps
apt_install valgrind
cd "$ROOT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# profile_binary BIN OUT: runs BIN's daemon under callgrind until it idles,
# sends it three turns over QUIC, stops it, and appends to OUT the functions
# defined in BIN that ran, in the order callgrind first names them.
profile_binary() {
    local bin="$1" out="$2" home
    home="$(mktemp -d -p "$WORK")"
    cat >"$home/config.toml" <<'TOML'
[llm]
provider = "scripted"

[llm.scripted]
file = "replies.toml"

[gateway]
bind = "127.0.0.1:0"
TOML
    printf 'on_exhausted = "repeat_last"\n\n[[reply]]\ntext = "hello"\n' >"$home/replies.toml"
    OPENPISTA_HOME="$home" "$bin" init >/dev/null
    echo "==> running $bin start under callgrind"
    OPENPISTA_HOME="$home" valgrind -q --tool=callgrind --demangle=no --dump-instr=no \
        --compress-strings=no --callgrind-out-file="$home/callgrind.out" \
        "$bin" start </dev/null >"$home/stdout" 2>"$home/stderr" &
    local pid=$!
    for _ in $(seq 600); do
        grep -q "listening on" "$home/stdout" && break
        kill -0 "$pid" 2>/dev/null || { cat "$home/stderr"; exit 1; }
        sleep 0.2
    done
    grep -q "listening on" "$home/stdout" || { echo "the daemon never listened" >&2; exit 1; }
    sleep 5
    local addr
    addr="$(sed -n 's/.* listening on \([^ ]*\) .*/\1/p' "$home/stdout")"
    for _ in 1 2 3; do
        OPENPISTA_HOME="$home" "$bin" run -e "hi" --remote "$addr" >/dev/null 2>&1
    done
    sleep 2
    kill -TERM "$pid"
    wait "$pid"
    grep -q "stopped" "$home/stdout" || { echo "the daemon did not stop cleanly" >&2; exit 1; }
    nm --defined-only "$bin" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u >"$home/defined"
    grep -E '^c?fn=' "$home/callgrind.out" | sed -E 's/^c?fn=(\([0-9]+\) ?)?//' | awk 'NF && !seen[$0]++' >"$home/ran"
    awk 'NR==FNR {d[$0]=1; next} ($0 in d)' "$home/defined" "$home/ran" >>"$out"
}

# The release build keeps its symbol table (strip = "debuginfo"), so the
# binary profiled is the one that ships. Symbol names carry a hash of each
# crate's build settings: a list recorded from another profile or toolchain
# matches little of this one.
BIN="$CARGO_TARGET_DIR/release/openpista"
cargo build --release --locked -p openpista-cli
profile_binary "$BIN" "$WORK/order"
awk '!seen[$0]++' "$WORK/order" >crates/cli/startup-order.txt
echo "==> crates/cli/startup-order.txt: $(wc -l <crates/cli/startup-order.txt) functions"
