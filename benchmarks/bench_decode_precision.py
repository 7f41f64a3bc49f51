"""Is the non-exact bf16 decode's error below the autoencoder's own reconstruction error?

The issue's rule for a faster, non-exact decode mode: never the default unless its error (against the exact
decode) is below the autoencoder's own reconstruction error on real volumes. No trained weights of the authors'
8x autoencoder and no real CT/MR volumes can be fetched on this project's machines, so this measures the bundled
demo autoencoder on the data it was trained for (procedural phantoms of its anatomies, percentile-normalised to
[-1, 1] at the demo spacings, as in training): for each volume, encode -> quantize -> exact decode (the
reconstruction error, against the input) and bf16 decode (the bf16 error, against the exact decode).

    python benchmarks/bench_decode_precision.py                  # 4 phantoms per demo anatomy, demo size
    python benchmarks/bench_decode_precision.py --model PATH     # another bundle (e.g. a real-data model)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, "..")]


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bundle folder (default: the bundled demo model)")
    ap.add_argument("--per-anatomy", type=int, default=4)
    ap.add_argument("--scale", type=int, default=1, help="volume edge = scale x the anatomy's first latent size x f")
    args = ap.parse_args()
    from MedDiffusionLib.checkpoints.bundle import load_bundle
    from MedDiffusionLib.data.phantoms import ANATOMIES, make_phantom_array
    from MedDiffusionLib.data.transforms import normalize_percentile
    from MedDiffusionLib.pipelines.decode import decode_latent

    bundle = load_bundle(args.model)
    ae = bundle.autoencoder.eval()
    f = bundle.downsample
    print(f"# {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print("| anatomy | volume | AE reconstruction RMSE (exact decode vs input) | bf16 decode RMSE vs exact | "
          "bf16 max abs | ratio bf16 / reconstruction |")
    print("|---|---|---|---|---|---|")
    for entry in bundle.catalog:
        if entry.name not in ANATOMIES:
            continue
        shape = tuple(args.scale * n * f for n in entry.latent_sizes[0])
        spacing = tuple(s / args.scale for s in entry.spacing_xyz)
        recon, bf16, worst = [], [], 0.0
        for seed in range(args.per_anatomy):
            vol = make_phantom_array(entry.name, shape, spacing, seed=1000 + seed)
            x = torch.from_numpy(normalize_percentile(vol)[0])[None, None]
            with torch.inference_mode():
                z_q, _ = ae.quantize(ae.encode(x, patch_size=bundle.encode_patch_size))
                exact = decode_latent(ae, z_q)
                approx = decode_latent(ae, z_q, precision="bf16")
            recon.append(_rmse(exact, x))
            bf16.append(_rmse(approx, exact))
            worst = max(worst, float((approx - exact).abs().max()))
        r, b = sum(recon) / len(recon), sum(bf16) / len(bf16)
        print(f"| {entry.name} | {'x'.join(map(str, shape))} | {r:.4f} | {b:.5f} | {worst:.4f} | {b / r:.3f} |")
    print("\nIntensities in the network's [-1, 1] range (RMSE over voxels, mean over volumes).")


if __name__ == "__main__":
    main()
