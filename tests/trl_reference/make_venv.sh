#!/usr/bin/env bash
# Build the TRL 0.23.1 reference venv used by the parity tests (idempotent).
#
# Why a separate venv: TRL's IterativeSFTTrainer was deleted in TRL 0.24 and 0.23.1
# crashes on transformers 5 (Trainer._nested_gather is gone), so the reference
# needs transformers 4.57.6, which cannot live beside the project's transformers 5.
#
#   JAXSFT_REF_VENV   where the venv goes (default: <repo>/.ref-venv, gitignored)
#
# Exit codes: 0 ready; 75 pip could not reach a package index (callers may skip);
# anything else is a real failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${JAXSFT_REF_VENV:-$repo/.ref-venv}"
pins=(torch==2.13.0 transformers==4.57.6 trl==0.23.1)
marker="$venv/.jaxsft-ref-ready"

is_ready() {
    [[ -f "$marker" && -x "$venv/bin/python" ]] &&
        [[ "$(cat "$marker")" == "${pins[*]}" ]] &&
        "$venv/bin/python" - <<'PY' >/dev/null 2>&1
import torch, transformers, trl
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert transformers.__version__ == "4.57.6", transformers.__version__
assert trl.__version__ == "0.23.1", trl.__version__
PY
}

mkdir -p "$(dirname "$venv")"
# One builder at a time (parallel pytest workers, two checkouts sharing the path). The lock
# lives outside the repo so it never shows up in git status.
lock="${TMPDIR:-/tmp}/jaxsft-ref-venv-$(printf %s "$venv" | md5sum | cut -c1-12).lock"
exec 9>"$lock"
flock 9

if is_ready; then
    echo "reference venv ready: $venv"
    exit 0
fi

rm -rf "$venv"
python3 -m venv "$venv"
log="$(mktemp)"
# torch is pinned in the same command, or pip would pick a CUDA build (environment.md §1).
if ! "$venv/bin/python" -m pip install -q "${pins[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    if ! "$venv/bin/python" -m pip download -q --no-deps --dest "$(mktemp -d)" trl==0.23.1 >/dev/null 2>&1; then
        echo "make_venv.sh: pip cannot reach a package index to fetch ${pins[*]}" >&2
        rm -rf "$venv"
        exit 75
    fi
    echo "make_venv.sh: pip install failed although an index is reachable (see above)" >&2
    rm -rf "$venv"
    exit 1
fi
rm -f "$log"
echo "${pins[*]}" >"$marker"
is_ready || { echo "make_venv.sh: venv built but the version check failed" >&2; exit 1; }
echo "reference venv ready: $venv"
