"""Checkpoints and manifests that claim more than they hold: refused with one line, before allocating.

Memory is measured in a subprocess (peak RSS and peak virtual size from the kernel) so that an allocation that
slipped through would show up even if its pages were never touched.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_AE_CONFIG, TINY_DENOISER_CONFIG, make_tiny_bundle, tiny_bundle
from safetensors.torch import save_file

from MedDiffusionLib.checkpoints import load_bundle, load_network, safe_torch_load, save_bundle
from MedDiffusionLib.checkpoints.official import load_official_autoencoder
from MedDiffusionLib.checkpoints.safe_pickle import UnsafePickleError, safe_pickle_module
from MedDiffusionLib.cli import main
from MedDiffusionLib.errors import CheckpointError, InputError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- crafted files
def _call(module: str, name: str, *args: object) -> bytes:
    """Protocol-2 pickle body that calls module.name(*args) (no PROTO/STOP)."""
    return f"c{module}\n{name}\n".encode() + pickle.dumps(args, 2)[2:-1] + b"R"


def _zip_checkpoint(pkl_body: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    """A torch.save-layout archive whose data.pkl is ``PROTO 2 + body + STOP``."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02" + pkl_body + b".")
        zf.writestr("archive/byteorder", b"little")
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", b"3\n")
    return out.getvalue()


def _storage_pid(numel: int, key: str = "0") -> bytes:
    # BINPERSID of ('storage', torch.FloatStorage, key, 'cpu', numel)
    return b"(X\x07\x00\x00\x00storage" + b"ctorch\nFloatStorage\n" + pickle.dumps(key, 2)[2:-1] + \
        b"X\x03\x00\x00\x00cpu" + pickle.dumps(numel, 2)[2:-1] + b"tQ"


def _rebuild(size: int, key: str = "0", numel: int = 4) -> bytes:
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + _storage_pid(numel, key) + b"K\x00" +
            pickle.dumps((size,), 2)[2:-1] + pickle.dumps((1,), 2)[2:-1] + b"\x89" +
            b"ccollections\nOrderedDict\n)Rt" + b"R")


def _legacy_claim(numel: int) -> bytes:
    """A legacy-format file whose one tensor claims ``numel`` floats (none follow)."""
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, 2), pickle.dumps(1001, 2),
             pickle.dumps({"protocol_version": 1001, "little_endian": True,
                           "type_sizes": {"short": 2, "int": 4, "long": 4}}, 2)]
    pid = b"(X\x07\x00\x00\x00storage" + b"ctorch\nFloatStorage\n" + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpu" + \
        pickle.dumps(numel, 2)[2:-1] + b"NtQ"
    parts.append(b"\x80\x02" + pid + b".")
    parts.append(pickle.dumps(["0"], 2))
    return b"".join(parts) + (4).to_bytes(8, "little") + b"\0" * 16


def _safetensors(path: Path, kind: str, config: dict, tensors: dict | None = None) -> Path:
    meta = {"format": "meddiffusion", "format_version": "1", "kind": kind, "config": json.dumps(config),
            "extra": "{}"}
    save_file(tensors or {}, str(path), metadata=meta)
    return path


ATTACKS = {
    # name -> bytes of a .pt file; each one would allocate at least 1 GiB if its claim were believed
    "bytearray": _zip_checkpoint(_call("builtins", "bytearray", 1 << 30)),
    "bytes": _zip_checkpoint(_call("builtins", "bytes", 1 << 30)),
    "tensor-class": _zip_checkpoint(_call("torch", "FloatTensor", 1 << 28)),
    "storage-class": _zip_checkpoint(_call("torch.storage", "UntypedStorage", 1 << 30)),
    "storage-claim": _zip_checkpoint(_rebuild(1, numel=1 << 28), {"0": b"\0" * 16}),
    "view-beyond-storage": _zip_checkpoint(_rebuild(1 << 28), {"0": b"\0" * 16}),
    "numpy-shape": _zip_checkpoint(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n" +
                                   pickle.dumps((1 << 30,), 2)[2:-1] + b"C\x01btR"),
    # _codecs.encode(text, 'latin1'), then 20 x 'hex' (each doubles): 1 KiB -> 1 GiB
    "hex-chain": _zip_checkpoint(b"c_codecs\nencode\n(" * 21 + b"X\x00\x04\x00\x00" + b"a" * 1024 +
                                 b"X\x06\x00\x00\x00latin1tR" + b"X\x03\x00\x00\x00hextR" * 20),
    "legacy-claim": _legacy_claim(1 << 28),
}
BIG_CODES = {**TINY_AE_CONFIG, "n_codes": 1 << 24}


_PROBE = textwrap.dedent('''
    import json, resource, sys
    from pathlib import Path
    import torch
    from MedDiffusionLib.checkpoints import load_network, safe_torch_load
    from MedDiffusionLib.errors import CheckpointError

    def peaks():
        vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmPeak"))
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, vm // 1024

    folder = Path(sys.argv[1])
    safe_torch_load(folder / "warmup.pt")  # first use imports and allocates what every load needs
    base = peaks()
    report = {}
    for f in sorted(folder.iterdir()):
        if f.name == "warmup.pt":
            continue
        try:
            (load_network if f.suffix == ".safetensors" else safe_torch_load)(f)
            outcome = "loaded"
        except CheckpointError as exc:
            outcome = "refused: " + str(exc)
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        rss, vm = peaks()
        report[f.name] = {"outcome": outcome, "rss_mb": rss - base[0], "vm_mb": vm - base[1]}
        if rss - base[0] > 600 or vm - base[1] > 3000:
            break  # an allocation got through: stop before the next one adds to it
    print(json.dumps(report))
''')


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory read from /proc (Linux)")
def test_allocation_bombs_are_refused_before_allocating(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(4)}, tmp_path / "warmup.pt")
    for name, data in ATTACKS.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
    _safetensors(tmp_path / "n_codes.safetensors", "autoencoder", BIG_CODES)  # the 253-byte file of issue 11
    # In range for every field, but 2^30 codebook entries the (empty) file does not hold: the meta build.
    _safetensors(tmp_path / "in-range.safetensors", "autoencoder",
                 {**TINY_AE_CONFIG, "n_codes": 1 << 20, "embedding_dim": 1024})
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == len(ATTACKS) + 2, report
    for name, r in report.items():
        assert r["outcome"].startswith("refused: ") and "\n" not in r["outcome"], (name, r)
        # Small fixed margin: the refusals happen before any allocation the file merely claims.
        assert r["rss_mb"] < 100 and r["vm_mb"] < 300, (name, r)


# ------------------------------------------------------------------------------------------ pickle checks
@pytest.mark.parametrize("body, fragment", [
    (_call("builtins", "bytearray", 1 << 31), "bytearray"),
    (_call("builtins", "list", "x" * 10), "list"),
    (_call("_codecs", "encode", b"abc", "hex"), "codec"),
    (_call("builtins", "str", 12345), "str"),
    (b"ccollections\ndefaultdict\ncbuiltins\nbytearray\n\x85R", "default factory"),
])
def test_calls_with_allocating_arguments_are_refused(body: bytes, fragment: str) -> None:
    with pytest.raises(UnsafePickleError, match=fragment):
        safe_pickle_module.loads(b"\x80\x02" + body + b".")


def test_object_flood_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1-byte opcodes that each create a 216-byte set: every opcode is charged what it can build, so the
    # objects of any pickle stay under the cap (lowered here to keep the test fast).
    monkeypatch.setattr("MedDiffusionLib.checkpoints.safe_pickle.MAX_PICKLE_OBJECT_BYTES", 16 << 20)
    data = b"\x80\x04" + b"\x8f" * (1 << 20) + b"."
    with pytest.raises(UnsafePickleError, match="more than 16 MiB of objects"):
        safe_pickle_module.loads(data)


def test_plain_bytes_and_sets_still_load(tmp_path: Path) -> None:
    obj = {"b": b"\x00\xff" * 10, "ba": bytearray(b"xy"), "s": {1, 2}, "fs": frozenset({3}), "c": 1 + 2j}
    torch.save(obj, tmp_path / "ok.pt")
    assert safe_torch_load(tmp_path / "ok.pt") == obj


# ------------------------------------------------------------------------------------------ config checks
@pytest.mark.parametrize("kind, change, fragment", [
    ("autoencoder", {"n_codes": 1e12}, "n_codes must be an integer"),
    ("autoencoder", {"n_codes": 1 << 28}, "n_codes must be in 1..1048576"),
    ("autoencoder", {"n_hiddens": -8}, "n_hiddens must be in"),
    ("autoencoder", {"downsample": 6}, "downsample must be a power of two"),
    ("autoencoder", {"embedding_dim": "4"}, "embedding_dim must be an integer"),
    ("autoencoder", {"num_groups": 3}, "cannot build the autoencoder"),
    ("autoencoder", {"evil": 1}, "unknown config field(s) evil"),
    ("biflownet", {"dim_mults": [1] * 1000}, "dim_mults must be a list of 1..8"),
    ("biflownet", {"mlp_ratio": float("nan")}, "mlp_ratio must be a finite number"),
    ("biflownet", {"dim": 24}, "weights do not match"),
])
def test_bad_configs_give_one_line_errors(tmp_path: Path, kind: str, change: dict, fragment: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tiny_bundle(seed=2)
    net = bundle.autoencoder if kind == "autoencoder" else bundle.denoiser
    base = TINY_AE_CONFIG if kind == "autoencoder" else {**TINY_DENOISER_CONFIG, "dim_mults": [1, 1, 2],
                                                          "use_attn": [0, 0, 1]}
    path = _safetensors(tmp_path / "net.safetensors", kind, {**base, **change},
                        {k: v.contiguous() for k, v in net.state_dict().items()})
    with pytest.raises(CheckpointError) as info:
        load_network(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    # Through the CLI: one line on stderr, no traceback.
    folder = make_tiny_bundle(tmp_path / "bundle")
    target = folder / ("autoencoder.safetensors" if kind == "autoencoder" else "denoiser.safetensors")
    target.write_bytes(path.read_bytes())
    assert main(["anatomies", "--model", str(folder)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err


def test_official_overrides_are_validated(reference_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="num_groups must be in"):
        load_official_autoencoder(reference_dir / "fixtures" / "ae_tiny_official_format.ckpt",
                                  overrides={"num_groups": -4})


# ------------------------------------------------------------------------------------------- model.yaml
def _bundle_with_manifest(tmp_path: Path, text: str) -> Path:
    folder = make_tiny_bundle(tmp_path / "bundle")
    (folder / "model.yaml").write_text(text)
    return folder


def test_yaml_alias_bomb_is_refused_fast(tmp_path: Path) -> None:
    good = (make_tiny_bundle(tmp_path / "good") / "model.yaml").read_text()
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    folder = _bundle_with_manifest(tmp_path, good + "\n".join(lines) + "\n")
    assert len((folder / "model.yaml").read_bytes()) < 4096  # 9^10 = 3.5e9 strings once expanded
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="aliases") as info:
        load_bundle(folder)
    assert time.perf_counter() - start < 2 and "\n" not in str(info.value)


@pytest.mark.parametrize("text, fragment", [
    ("format: meddiffusion-bundle\n" + "#" * (1 << 20), "larger than"),
    ("x: " + "[" * 5000 + "]" * 5000, "nests too deeply"),
    ("a: [1, 2\n", "not valid YAML"),
])
def test_oversized_deep_or_broken_manifests(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(CheckpointError, match=fragment) as info:
        load_bundle(_bundle_with_manifest(tmp_path, text))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("change, fragment", [
    ({"diffusion": {"timesteps": 10 ** 12, "schedule": "cosine"}}, "diffusion.timesteps"),
    ({"diffusion": {"timesteps": 1000, "schedule": "evil"}}, "diffusion.schedule"),
    ({"encode_patch_size": 10 ** 9}, "encode_patch_size"),
    ({"denoiser_options": [1, 2]}, "denoiser_options must be a mapping"),
])
def test_manifest_values_are_bounded(tmp_path: Path, change: dict, fragment: str) -> None:
    folder = make_tiny_bundle(tmp_path / "bundle")
    data = yaml.safe_load((folder / "model.yaml").read_text())
    (folder / "model.yaml").write_text(yaml.safe_dump({**data, **change}))
    with pytest.raises(CheckpointError, match=fragment):
        load_bundle(folder)


def test_written_manifests_never_use_aliases(tmp_path: Path) -> None:
    bundle = tiny_bundle(seed=3)
    shared = {"timesteps": 1000, "schedule": "cosine"}
    bundle.diffusion = shared
    folder = save_bundle({"autoencoder": bundle.autoencoder, "denoiser": bundle.denoiser,
                          "catalog": bundle.catalog, "diffusion": shared, "name": "x"}, tmp_path / "b")
    text = (folder / "model.yaml").read_text()
    assert "&" not in text and "*id" not in text
    assert load_bundle(folder).diffusion == shared
    assert math.isfinite(load_bundle(folder).latent_range[0])


def test_training_checkpoints_and_vgg_weights_use_the_safe_reader(tmp_path: Path) -> None:
    """torch's weights_only allow-list still lets a pickle call bytearray(n); our other .pt readers must not."""
    from Training.checkpointing import load_checkpoint

    from MedDiffusionLib.models.perceptual import load_vgg16_state_dict

    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(_zip_checkpoint(_call("builtins", "bytearray", 1 << 31)))
    with pytest.raises(CheckpointError, match="bytearray"):
        load_checkpoint(bomb)
    with pytest.raises(InputError, match="bytearray"):  # the perceptual loss reports user input as InputError
        load_vgg16_state_dict(bomb)
