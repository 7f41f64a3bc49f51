"""Entry point of the local job server that the Slicer module starts: `PythonSlicer server_child.py LIBROOT serve ...`.

It runs `meddiffusion serve` (MedDiffusionLib.cli) with one addition: the server exits as soon as its standard
input reaches end-of-file. The module keeps the write end of that pipe open for its whole life and never writes
to it, so when Slicer exits or crashes (even killed, when no atexit handler runs) the operating system closes the
pipe and the server goes away with it, on every platform. Qt-free and Slicer-free: it runs in a plain Python.
"""
from __future__ import annotations

import os
import sys
import threading
import traceback


def _exit_when_parent_goes() -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass  # the module never writes; anything read is ignored
    except (OSError, ValueError):
        pass
    os._exit(0)  # no graceful shutdown: the job store is a private temporary folder


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: server_child.py LIBROOT serve [options]", file=sys.stderr)
        return 2
    root, args = argv[0], argv[1:]
    if root and root not in sys.path:
        sys.path.insert(0, root)
    threading.Thread(target=_exit_when_parent_goes, name="meddiffusion-parent-watch", daemon=True).start()
    # The panel shows the log's last line while the server starts: say what takes the time.
    print("meddiffusion: loading PyTorch and the model...", file=sys.stderr, flush=True)
    from MedDiffusionLib.cli import main as cli_main

    return int(cli_main(args) or 0)


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    code = _run(sys.argv[1:])
    # Not sys.exit: the watcher thread is blocked reading stdin, and interpreter shutdown then aborts on that
    # stream's lock (exit -6, a fatal-error dump in place of the CLI's message at the end of the log, which is
    # what the panel shows). Nothing else needs finalising once the streams are flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
