#!/usr/bin/env bash
# Download, here, the wheels tools/gpu_check.sh installs on a GPU machine that has Python 3.12
# and torch 2.11 but no megatron-core (and no network): cp312, manylinux x86_64, one version of
# each, no dependency resolution (--no-deps; each wheel's Requires-Dist was checked by hand and
# is printed below so a version bump can be checked again).
#
#   bash tools/fetch_gpu_wheels.sh [DIR]      # default DIR: .whl (ignored by git)
#
# What the check imports beyond torch 2.11: megatron-core (engine), webdataset + braceexpand
# (megatron_uni.data imports its readers), open_clip_torch (only for the BPE merges file
# bpe_simple_vocab_16e6.txt.gz that megatron_uni/data/text_tokenizer.py finds with find_spec; it
# is never imported), ftfy + wcwidth (tokenizer text cleaning), regex, pyyaml (configs), timm
# (transforms), psutil (dist_checkpointing). The versions are requirements.txt's (what CI uses);
# they shadow the GPU image's own copies under PYTHONPATH=/tmp/site.
# Not carried: timm's and open_clip's safetensors and huggingface-hub, and hf-xet, click, httpx,
# tqdm, filelock, fsspec, packaging, numpy, torchvision: the GPU image has them (device
# KINDS.md), and CI's huggingface-hub 2.4 would need httpx2, which the image lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-/work/main/.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$DIR"
WHEELS=(
  megatron-core==0.16.1
  webdataset==1.0.2
  braceexpand==0.1.7
  PyYAML==6.0.4
  timm==1.0.31
  open_clip_torch==3.3.0
  ftfy==6.3.1
  wcwidth==0.9.4
  regex==2026.11.19
  psutil==7.2.2
)
PLATFORMS=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DIR" "${WHEELS[@]}"
echo "wheels in $DIR ($(du -sh "$DIR" | cut -f1)):"
for whl in "$DIR"/*.whl; do
  echo "  $(basename "$whl")"
  unzip -p "$whl" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
    | sed 's/^/      /' || true
done
