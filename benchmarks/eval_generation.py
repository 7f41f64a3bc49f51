"""Sample quality of a model bundle vs held-out phantoms, per sampler, next to an untrained denoiser.

Prints a markdown table (Frechet distance and MMD on autoencoder features, MMD on network-free intensity/gradient
features) and writes a preview grid (rows: anatomies; columns: a held-out phantom, then samples; each cell shows
axial | coronal | sagittal mid-slices). See MedDiffusionLib/metrics/features.py for why the feature network is the
bundle's own encoder.

    python benchmarks/eval_generation.py --per-class 6 --preview docs/images/demo_samples.png
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from MedDiffusionLib.checkpoints.bundle import load_bundle
from MedDiffusionLib.data.phantoms import make_phantom
from MedDiffusionLib.data.transforms import image_to_network, normalize_percentile
from MedDiffusionLib.io.preview import mid_slice_montage, write_png
from MedDiffusionLib.metrics.distribution import frechet_distance, mmd, simple_volume_features
from MedDiffusionLib.metrics.features import AutoencoderFeatures
from MedDiffusionLib.models.biflownet import BiFlowNet
from MedDiffusionLib.pipelines.common import denormalize_latent, sample_latents
from MedDiffusionLib.pipelines.decode import decode_latent

HELD_OUT_SEED = 10_000  # training phantoms use seeds below this


def phantoms(bundle, per_class: int, seed0: int) -> list[np.ndarray]:
    """Phantoms in network order and [-1, 1], at each anatomy's first size and spacing."""
    out = []
    for a in bundle.catalog:
        size = a.volume_sizes_xyz(bundle.downsample)[0]
        for i in range(per_class):
            img = make_phantom(a.name, size_xyz=size, spacing_xyz=a.spacing_xyz, seed=seed0 + i)
            out.append(normalize_percentile(image_to_network(img))[0])
    return out


@torch.no_grad()
def samples(bundle, denoiser, sampler: str, steps: int, per_class: int, seed: int) -> list[np.ndarray]:
    """Sampling of every anatomy, batched across anatomies that share a latent size; decoded to [-1, 1]."""
    by_size: dict[tuple, list] = {}
    for a in bundle.catalog:
        by_size.setdefault(tuple(a.latent_sizes[0]), []).append(a)
    vols: dict[str, list[np.ndarray]] = {}
    for latent, group in by_size.items():
        y = torch.tensor([a.class_index for a in group for _ in range(per_class)])
        res = torch.tensor([latent] * len(y), dtype=torch.float32) / float(denoiser.config.get("vq_size", 64))
        seeds = [seed + i for i in range(len(y))]  # one noise stream per volume, as the dataset generator does
        z = sample_latents(lambda x, t: denoiser(x, t, y, res), (denoiser.config["channels"],) + latent, seeds,
                           sampler, steps, torch.device("cpu"))
        z_q, _ = bundle.autoencoder.quantize(denormalize_latent(z, bundle.latent_range))
        decoded = decode_latent(bundle.autoencoder, z_q).clamp(-1, 1)
        for k, a in enumerate(group):
            vols[a.name] = [v[0].numpy() for v in decoded[k * per_class:(k + 1) * per_class]]
    return [v for a in bundle.catalog for v in vols[a.name]]


def scores(gen: list[np.ndarray], ref: list[np.ndarray], feat: AutoencoderFeatures) -> dict[str, float]:
    fa, fb = np.stack([feat(v) for v in gen]), np.stack([feat(v) for v in ref])
    sa, sb = np.stack([simple_volume_features(v) for v in gen]), np.stack([simple_volume_features(v) for v in ref])
    return {"FD (AE features)": frechet_distance(fa, fb), "MMD (AE features)": mmd(fa, fb),
            "MMD (intensity/gradient)": mmd(sa, sb)}


def preview(bundle, ref: list[np.ndarray], gen: list[np.ndarray], per_class: int, columns: int) -> np.ndarray:
    rows = []
    for k, a in enumerate(bundle.catalog):
        cells = [ref[k * per_class]] + gen[k * per_class:k * per_class + columns]
        # network (Z, X, Y) -> SimpleITK order (Z, Y, X) for the montage; [-1, 1] window
        tiles = [mid_slice_montage(v.transpose(0, 2, 1), a.spacing_xyz, window=(-1, 1), min_height=96)
                 for v in cells]
        h = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 8)), constant_values=255) for t in tiles]
        rows.append(np.pad(np.concatenate(tiles, axis=1), ((0, 8), (0, 0)), constant_values=255))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=255) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bundle folder (default: the bundled demo model)")
    ap.add_argument("--per-class", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs="+", default=["ddpm:1000", "ddim:50", "dpmpp:20"])
    ap.add_argument("--preview", help="PNG of held-out phantoms and DPM-Solver++ samples per anatomy")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    bundle = load_bundle(args.model)
    bundle.autoencoder.eval()
    feat = AutoencoderFeatures(bundle.autoencoder)
    held_out = phantoms(bundle, args.per_class, HELD_OUT_SEED)
    train_like = phantoms(bundle, args.per_class, 0)
    untrained = BiFlowNet(**bundle.denoiser.config).eval()
    rows = [("training phantoms (reference)", "-", scores(train_like, held_out, feat), 0.0)]
    for model_name, denoiser in (("demo model", bundle.denoiser.eval()), ("untrained denoiser", untrained)):
        for run in args.runs:
            sampler, steps = run.split(":")
            t0 = time.perf_counter()
            gen = samples(bundle, denoiser, sampler, int(steps), args.per_class, args.seed)
            rows.append((model_name, f"{sampler}-{steps}", scores(gen, held_out, feat), time.perf_counter() - t0))
            if args.preview and model_name == "demo model" and sampler == "dpmpp":
                write_png(args.preview, preview(bundle, held_out, gen, args.per_class, 3))
    n = args.per_class * len(list(bundle.catalog))
    print(f"# python {' '.join(sys.argv)}")
    print(f"# {n} volumes per row vs {n} held-out phantoms (seeds {HELD_OUT_SEED}+); lower is better\n")
    keys = list(rows[0][2])
    print("| model | sampler | " + " | ".join(keys) + " | sampling time (s) |")
    print("|---" * (len(keys) + 3) + "|")
    for name, sampler, s, secs in rows:
        print(f"| {name} | {sampler} | " + " | ".join(f"{s[k]:.4g}" for k in keys) + f" | {secs:.0f} |")


if __name__ == "__main__":
    main()
