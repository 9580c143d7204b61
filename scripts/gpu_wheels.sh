#!/usr/bin/env bash
# Download the Python packages that a bare GPU image with JAX, Flax and PyTorch lacks and ibl_jax needs, as
# Python 3.12 wheels, into .whl/ (in .gitignore), for `scripts/gpu_check.sh` to install offline.
#
#   bash scripts/gpu_wheels.sh            # here, where pip can reach an index
#
# The list is what the H200 image's package list (as read on 2026-11-17) lacks: datasets and its dill and
# multiprocess, ml_collections, tensorboardX; and Flax and Orbax within requirements.txt's caps, whatever the
# image's are (NNX moves between releases; the suite passed with them on the image's JAX 0.11.2, CPU, 2026-12-03).
# Add a package here if gpu_check.sh stops on its import.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "datasets>=5.2.0" "dill" "multiprocess" "ml_collections>=1.1.0" "tensorboardX>=2.6.2" \
  "flax>=0.12.8,<0.13" "orbax-checkpoint>=0.12.8,<0.13"
ls -l .whl
