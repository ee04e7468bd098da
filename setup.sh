#!/usr/bin/env bash
# Creates .venv in the repository root and installs tml with the pinned torch / torchrec / fbgemm stack.
#   ./setup.sh               CPU stack, or the CUDA stack when `nvidia-smi` works
#   TML_DEVICE=cuda ./setup.sh   force the CUDA stack;  TML_DEVICE=cpu ./setup.sh  force the CPU stack
#   PYTHON=/path/to/python3.12 ./setup.sh   choose the interpreter (3.11 or newer)
# A second run with nothing changed only checks the environment and prints the versions.
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  local candidates=("${PYTHON:-}" python3.13 python3.12 python3.11 python3)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  return 1
}

if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  if ! BASE_PY=$(find_python); then
    echo "setup.sh: tml needs Python 3.11 or newer; none found (tried \$PYTHON, python3.13, python3.12, python3.11, python3)." >&2
    echo "Install one (e.g. 'apt-get install python3.11 python3.11-venv') or point PYTHON at it." >&2
    exit 1
  fi
  echo "setup.sh: creating .venv with $BASE_PY ($("$BASE_PY" --version))"
  "$BASE_PY" -m venv .venv
  PY=.venv/bin/python
fi

DEVICE=${TML_DEVICE:-}
if [ -z "$DEVICE" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
case "$DEVICE" in
  cpu|cuda) ;;
  *) echo "setup.sh: TML_DEVICE must be 'cpu' or 'cuda', got '$DEVICE'" >&2; exit 1 ;;
esac

TORCHREC_VERSION=1.8.0
STAMP=.venv/.tml-setup-stamp
WANT="$DEVICE $(cat setup.sh requirements/$DEVICE.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$PY" -c 'import torchrec, tml' 2>/dev/null; then
  echo "setup.sh: .venv is up to date ($DEVICE stack)"
else
  echo "setup.sh: installing the $DEVICE stack into .venv"
  PIP=("$PY" -m pip install --disable-pip-version-check --quiet)
  "${PIP[@]}" -r "requirements/$DEVICE.txt"
  # torchrec's own metadata asks for the CUDA fbgemm-gpu package: install it alone, then
  # re-assert the fbgemm build we chose in case anything overwrote the shared fbgemm_gpu/ folder.
  "${PIP[@]}" --no-deps "torchrec==$TORCHREC_VERSION"
  FBGEMM=$(grep -E '^fbgemm-gpu' "requirements/$DEVICE.txt")
  "$PY" -c 'import fbgemm_gpu' 2>/dev/null || "${PIP[@]}" --force-reinstall --no-deps "$FBGEMM"
  # pip's resolver will say "torchrec requires fbgemm-gpu, which is not installed": expected, see above.
  "${PIP[@]}" -e ".[dev]"
  echo "$WANT" > "$STAMP"
fi

"$PY" - <<'PY'
import importlib.metadata as md

import torch
import torchrec  # noqa: F401  (fails here, loudly, if fbgemm and torch do not match)


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


fbgemm = next(f"{n} {version(n)}" for n in ("fbgemm-gpu-cpu", "fbgemm-gpu") if version(n))
print(f"torch {torch.__version__} | torchrec {version('torchrec')} | {fbgemm}")
cuda = torch.cuda.is_available()
print(f"CUDA usable: {cuda}" + (f" ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})" if cuda else ""))
PY
echo "setup.sh: done. Activate with: source .venv/bin/activate"
