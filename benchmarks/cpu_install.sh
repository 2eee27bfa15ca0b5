#!/usr/bin/env bash
# A CPU-only training install, timed and measured: the README's CPU recipe in one command.
#
#   benchmarks/cpu_install.sh VENV [TORCH REQUIREMENT ...]
#
# Creates VENV with this Python, installs the given torch requirements (default: torch and
# torchvision from the CPU index, as the README's recipe does), then `.[train,dev]` (which
# keeps that torch), then swaps onnxruntime-gpu for plain onnxruntime. Prints the seconds of
# each step, the size (benchmarks/install_size.py), the versions, and whether `xrwatch
# doctor`, `xrwatch classify` on a real X-ray and a 1-epoch `xrwatch train` on synthetic data
# run. Measured here with the local mirror's CPU torch:
#   benchmarks/cpu_install.sh /tmp/cpuvenv \
#       /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl torchvision==0.28.0
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:?usage: benchmarks/cpu_install.sh VENV [TORCH REQUIREMENT ...]}"
shift
if [ "$#" -eq 0 ]; then
    set -- torch torchvision --index-url https://download.pytorch.org/whl/cpu
fi
step() { local t0=$SECONDS; "$@" >/dev/null; echo "  $(( SECONDS - t0 )) s"; }
echo "venv + pip:";            step python3 -m venv "$venv"
step "$venv/bin/pip" install -q --upgrade pip
echo "torch (CPU):";           step "$venv/bin/pip" install -q "$@"
echo ".[train,dev]:";          step "$venv/bin/pip" install -q -e "$here[train,dev]"
echo "onnxruntime swap:";      step bash -c "'$venv/bin/pip' uninstall -q -y onnxruntime-gpu && '$venv/bin/pip' install -q onnxruntime"
"$venv/bin/python" "$here/benchmarks/install_size.py" "$venv" | head -4
"$venv/bin/pip" list 2>/dev/null | grep -iE "^(torch|torchvision|onnxruntime|nvidia)" || true
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
check() { local what="$1"; shift; if "$@" >"$work/log" 2>&1; then echo "$what: ok"; else echo "$what: FAILED: $(tail -1 "$work/log")"; fi; }
real="$(find "$here/../shared/data/xray/real/Normal" -type f 2>/dev/null | head -1)"
check "xrwatch doctor" "$venv/bin/xrwatch" doctor
[ -n "$real" ] && check "xrwatch classify $(basename "$real")" "$venv/bin/xrwatch" classify "$real"
check "xrwatch synth" "$venv/bin/xrwatch" synth "$work/synth" --scale 0.05 --image-size 64
check "xrwatch train (1 epoch)" "$venv/bin/xrwatch" train --data "$work/synth" --epochs 1 \
    --image-size 32 --arch tinycnn --weights none --out "$work/runs" --name cpu
