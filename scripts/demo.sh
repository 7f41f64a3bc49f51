#!/usr/bin/env bash
# The README's main job: set up .venv, then generate a synthetic CT with the bundled demo model
# (writes out/demo_ct.nrrd and a PNG preview of three orthogonal mid-slices).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mkdir -p out
meddiffusion generate --anatomy ct-chest-abdomen --sampler dpmpp --steps 50 --seed 17 \
  --out out/demo_ct.nrrd --preview out/demo_ct.png "$@"
