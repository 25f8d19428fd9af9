#!/usr/bin/env bash
# The 12th carry of the e2e job (docs/perf/e2e.md): GSM8K train + test and the pure-Python wheels r1mega needs on
# the GPU machine beyond the TE / SGLang / SmolLM2 carries (hydra, omegaconf, math-verify, rich, wandb + deps).
# Run from the project root:  bash tools/device/prepare_e2e_carry.sh     -> .device/e2e (git-ignored)
# There:  bash .device/e2e/step.sh   (installs into /tmp/e2e_site, copies the data to /tmp/gsm8k, writes
# /tmp/carry/e2e_env.sh: PYTHONPATH += /tmp/e2e_site, GSM8K_DIR=/tmp/gsm8k)
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
ex=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$ex")"; grep -qx "/.device/" "$ex" 2>/dev/null || echo "/.device/" >> "$ex"
d=.device/e2e; rm -rf "$d"; mkdir -p "$d/gsm8k"
cp /work/shared/data/gsm8k/train.jsonl /work/shared/data/gsm8k/test.jsonl "$d/gsm8k/"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q "${plat[@]}" -d "$d" math-verify latex2sympy2_extended rich markdown-it-py mdurl pygments tqdm psutil pyyaml wandb 2>&1 \
  | grep -v 'is ignored' || true
# omegaconf 2.3 pins antlr4 4.9.3, which PyPI has only as an sdist: build its (pure-Python) wheel here
python3 -m pip download -q --no-deps --no-binary=:all: -d "$d/src" antlr4-python3-runtime==4.9.3 2>&1 | grep -v 'is ignored' || true
python3 -m pip wheel -q --no-deps -w "$d" "$d"/src/antlr4* && rm -rf "$d/src"
python3 -m pip download -q --no-deps "${plat[@]}" -d "$d" hydra-core==1.3.2 omegaconf==2.3.0 2>&1 | grep -v 'is ignored' || true
# already on the machine (torch's venv) or in the other carries: do not send them twice
rm -f "$d"/numpy-* "$d"/typing_extensions-* "$d"/requests-* "$d"/urllib3-* "$d"/idna-* "$d"/certifi-* \
  "$d"/charset_normalizer-* "$d"/packaging-* "$d"/filelock-* "$d"/sympy-* "$d"/mpmath-*
rm -f "$d"/antlr4_python3_runtime-4.1*  # latex2sympy2_extended runs on antlr4 4.9.3 too (omegaconf pins it)
cat > "$d/step.sh" <<'SH'
set -e; here=$(dirname "$0")
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/e2e_site "$here"/*.whl
mkdir -p /tmp/gsm8k /tmp/carry && cp "$here"/gsm8k/*.jsonl /tmp/gsm8k/
echo 'export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/e2e_site GSM8K_DIR=/tmp/gsm8k' > /tmp/carry/e2e_env.sh
echo "e2e ready: /tmp/gsm8k, /tmp/e2e_site (source /tmp/carry/e2e_env.sh)"
SH
du -sh "$d"; ls "$d"
