"""`meddiffusion reconstruct` and `meddiffusion evaluate` end to end on a tiny bundle and NRRD files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffusionLib.cli import main as cli_main
from MedDiffusionLib.data.phantoms import make_phantom

from helpers import make_tiny_bundle

FAST = ["--sampler", "ddim", "--steps", "2", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("model"), controlnets=True)


@pytest.fixture()
def ct_file(tmp_path) -> Path:
    img = sitk.Cast(make_phantom("ct-chest-abdomen", (20, 16, 6), (1.4, 1.4, 2.5), 4), sitk.sitkInt16)
    img.SetDirection((1, 0, 0, 0, 0, 1, 0, -1, 0))
    img.SetOrigin((-3.0, 4.0, 100.0))
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(img, str(path))
    return path


def test_reconstruct_sparse_ct_end_to_end(model, ct_file, tmp_path, capsys):
    out, fbp, report = tmp_path / "recon.nrrd", tmp_path / "fbp.nii.gz", tmp_path / "run.json"
    rc = cli_main(["reconstruct", "--task", "sparse-ct", "--views", "8", "--input", str(ct_file), "--out", str(out),
                   "--degraded-out", str(fbp), "--json", str(report), "--seed", "4", "--model", str(model), *FAST])
    assert rc == 0
    text = capsys.readouterr().out
    assert "seed 4" in text and "PSNR" in text and "measurement residual" in text and "method diffusion" in text
    assert "on the input grid, CT window [-1000, 1000] HU" in text
    assert "anatomy ct-head-neck: CT, in-plane field of view 28 mm" in text  # chosen, and the reason printed
    src = sitk.ReadImage(str(ct_file))
    for path in (out, fbp):
        img = sitk.ReadImage(str(path))
        assert img.GetSize() == src.GetSize() and img.GetPixelID() == src.GetPixelID()
        assert np.allclose(img.GetSpacing(), src.GetSpacing()) and np.allclose(img.GetOrigin(), src.GetOrigin())
        assert np.allclose(img.GetDirection(), src.GetDirection())
    info = json.loads(report.read_text())
    assert info["task"] == "sparse-ct" and info["views"] == 8 and info["seed"] == 4 and info["simulated"]
    assert info["method"] == "diffusion" and info["anatomy"] == "ct-head-neck"


@pytest.mark.parametrize("method", ["fbp", "sart", "tv"])
def test_model_free_methods(model, ct_file, tmp_path, capsys, method):
    out = tmp_path / "recon.nrrd"
    rc = cli_main(["reconstruct", "--task", "sparse-ct", "--method", method, "--views", "12", "--input",
                   str(ct_file), "--out", str(out), "--seed", "1", "--model", str(model), *FAST])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"method {method}" in text and "anatomy" not in text and "steps" not in text
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(ct_file)).GetSize()


def test_reconstruct_mri_already_degraded_without_consistency(model, tmp_path, capsys):
    src = make_phantom("mr-knee", (16, 16, 8), (1.0, 1.0, 1.0), 2)
    inp, out = tmp_path / "zf.mha", tmp_path / "recon.nrrd"
    sitk.WriteImage(src, str(inp))
    rc = cli_main(["reconstruct", "--task", "mri", "--acceleration", "4", "--mask", "gaussian", "--already-degraded",
                   "--no-data-consistency", "--anatomy", "mr-knee", "--input", str(inp), "--out", str(out),
                   "--model", str(model), *FAST])
    assert rc == 0, capsys.readouterr().err
    assert sitk.ReadImage(str(out)).GetSize() == src.GetSize()
    assert "data consistency off" in capsys.readouterr().out


@pytest.mark.parametrize("case,message", [
    ("unknown-task", "unknown task 'dehaze'"),
    ("wrong-method", "method 'zero-filled' does not apply to task 'sparse-ct'"),
    ("missing-controlnet", "no ControlNet for task 'sparse-ct'"),
    ("unreadable", "bad.nrrd"),
    ("missing-input", "nothere.nrrd"),
    ("unwritable", "does not exist"),
])
def test_reconstruct_errors_are_clear(model, ct_file, tmp_path, capsys, case, message):
    args = ["reconstruct", "--task", "sparse-ct", "--input", str(ct_file), "--out", str(tmp_path / "o.nrrd"),
            "--model", str(model), *FAST]
    if case == "unknown-task":
        args[2] = "dehaze"
    elif case == "wrong-method":
        args += ["--method", "zero-filled"]
    elif case == "missing-controlnet":
        args[args.index("--model") + 1] = str(make_tiny_bundle(tmp_path / "plain"))
    elif case == "unreadable":
        (tmp_path / "bad.nrrd").write_bytes(b"not a volume")
        args[args.index("--input") + 1] = str(tmp_path / "bad.nrrd")
    elif case == "missing-input":
        args[args.index("--input") + 1] = str(tmp_path / "nothere.nrrd")
    else:
        args[args.index("--out") + 1] = str(tmp_path / "no" / "such" / "o.nrrd")
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "meddiffusion: error:" in err and message in err
    assert not (tmp_path / "o.nrrd").exists()


def test_evaluate_prints_the_table(model, tmp_path, capsys):
    report = tmp_path / "eval.json"
    # An 80 mm field of view: the default 240 mm is a ~192^2 grid at the model's spacing (12 s more of decoding).
    rc = cli_main(["evaluate", "--task", "sparse-ct", "--views", "12", "--count", "1", "--size", "32", "32", "4",
                   "--spacing", "2.5", "2.5", "3", "--seed", "3", "--json", str(report), "--model", str(model), *FAST])
    assert rc == 0
    out = capsys.readouterr().out
    for row in ("fbp ", "sart ", "tv ", "diffusion "):
        assert row in out
    assert "PSNR (dB)" in out and "+-" in out and "32x32x4 voxels" in out and "[-1000, 1000] HU" in out
    data = json.loads(report.read_text())
    assert data["volumes"] == 1 and set(data["methods"]) == {"fbp", "sart", "tv", "diffusion"}
    assert all(np.isfinite(v["psnr"][0]) for v in data["methods"].values())
    # The diffusion prior's anatomy was chosen (no --anatomy): the choice and its reason are printed and recorded.
    assert len(data["anatomies"]) == 1 and f"anatomy {data['anatomies'][0]}: " in out


def test_evaluate_native_resolution_volumes(model, tmp_path, capsys):
    """Any fully sampled volume at its own resolution, not only model-sized phantoms."""
    path = tmp_path / "mr.nii.gz"
    sitk.WriteImage(make_phantom("mr-t1-brain", (48, 40, 4), (2.0, 2.0, 3.0), 8), str(path))
    assert cli_main(["evaluate", "--task", "mri", "--acceleration", "4", "--input", str(path), "--methods",
                     "zero-filled", "tv", "--model", str(model), *FAST]) == 0
    out = capsys.readouterr().out
    assert "zero-filled" in out and "48x40x4 voxels" in out and "diffusion" not in out


def test_controlnet_file_option_supplies_a_missing_task(tmp_path, ct_file, capsys):
    from MedDiffusionLib.checkpoints.bundle import load_bundle
    from MedDiffusionLib.checkpoints.native import save_network
    from MedDiffusionLib.models.controlnet import ControlNet

    plain = make_tiny_bundle(tmp_path / "plain")
    bundle = load_bundle(plain)
    cn = ControlNet.from_denoiser(bundle.denoiser, image_downsample=bundle.downsample)
    path = save_network(cn, tmp_path / "cn.safetensors", "controlnet")
    rc = cli_main(["reconstruct", "--task", "sparse-ct", "--views", "4", "--input", str(ct_file), "--out",
                   str(tmp_path / "o.nrrd"), "--model", str(plain), "--controlnet", str(path), *FAST])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "o.nrrd").is_file()
