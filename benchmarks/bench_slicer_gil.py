"""Jobs while the main thread holds the GIL between polls, as Slicer's PythonQt does while Qt idles.

Prints, for a demo-model generation (20 DDIM steps) and a 12-view sparse-CT reconstruction of a 32^3 phantom on
the local job server: the time to the created nodes when polled normally ("alone") and when every poll is
followed by a 200 ms libc usleep through ctypes.PyDLL (GIL held), and how long Cancel takes with the GIL held.
Testing/test_slicer_gil.py asserts the same (held < 3x alone, cancel < 2 s).

    python benchmarks/bench_slicer_gil.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "MedDiffusion"), str(REPO / "Testing")]

import slicer  # noqa: E402

import test_slicer_gil as harness  # noqa: E402
from MedDiffusionLib.data.phantoms import make_phantom  # noqa: E402
from MedDiffusionLogic import mrml_volumes  # noqa: E402
from MedDiffusionLogic.backends import LocalBackend  # noqa: E402
from MedDiffusionLogic.logic import MedDiffusionLogic  # noqa: E402


def main() -> int:
    backend = LocalBackend()
    backend.server.extra_env.update(OMP_NUM_THREADS="1")
    logic = MedDiffusionLogic(slicer.vtkMRMLScene(), backend)
    rows = []
    try:
        generate = lambda: logic.start_generate(harness._params())  # noqa: E731
        harness._run(logic, generate, gil_held=False)  # server start + model load, not compared
        phantom = make_phantom("ct-head-neck", (32, 32, 32), seed=2)
        source = mrml_volumes.image_to_volume_node(phantom, logic.scene, "phantom")
        recon = lambda: logic.start_reconstruct(harness._params(task="sparse-ct", views=12),  # noqa: E731
                                                input_node=source)
        for name, start in (("generation", generate), ("reconstruction", recon)):
            alone = harness._run(logic, start, gil_held=False)[0]
            held = harness._run(logic, start, gil_held=True, timeout_s=120)[0]
            rows.append((name, alone, held))
        logic.start_generate(harness._params(sampler="ddpm", steps=1000))
        while logic.poll().step < 2:
            harness._hold_gil()
        began = time.monotonic()
        logic.cancel()
        while not logic.poll().ended:
            harness._hold_gil()
        cancel_s = time.monotonic() - began
        logic.finish()
    finally:
        backend.stop()
    print(f"{'job':<15} {'alone s':>8} {'GIL held s':>11} {'ratio':>6}")
    for name, alone, held in rows:
        print(f"{name:<15} {alone:8.2f} {held:11.2f} {held / alone:6.2f}")
    print(f"cancel with the GIL held: {cancel_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
