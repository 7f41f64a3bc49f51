#!/usr/bin/env bash
# Reproduces the bundled demo model (models/demo) from scratch on a CPU: phantoms -> autoencoder (2 stages)
# -> cached latents -> BiFlowNet -> bundle -> the two demo ControlNets. About 1-1.5 hours on 2 cores.
# Each stage resumes where it stopped if re-run with RESUME=--resume.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
R=${RESUME:-}
FROM=${FROM:-1}
run() { echo "== $*"; python Training/train.py "$@" $R; }
[ "$FROM" -le 1 ] && run autoencoder --stage 1 --config Training/configs/demo_autoencoder_stage1.yaml
[ "$FROM" -le 2 ] && run autoencoder --stage 2 --config Training/configs/demo_autoencoder_stage2.yaml
[ "$FROM" -le 3 ] && python Training/train.py latents --config Training/configs/demo_latents.yaml
[ "$FROM" -le 4 ] && run denoiser --config Training/configs/demo_denoiser.yaml
[ "$FROM" -le 5 ] && python Training/train.py export --config Training/configs/demo_export.yaml
[ "$FROM" -le 6 ] && run controlnet --config Training/configs/demo_controlnet_sparse_ct.yaml
[ "$FROM" -le 7 ] && run controlnet --config Training/configs/demo_controlnet_mri.yaml
echo "demo model written to models/demo"
