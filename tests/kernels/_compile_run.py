"""The compile run of ``tests/kernels/test_compile_gpu.py`` (``python -m kernels.gpu_compile`` in a subprocess,
``TRITON_INTERPRET=0``), started as soon as collection ends when that module is collected, so that its minutes of
``triton.compile`` and ``ptxas`` overlap the rest of the suite instead of adding to it; the module's fixture then
waits for it (or starts it, when the module runs alone)."""
import os
import subprocess
import sys
import tempfile

ARCHS = (90, 80)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RUN: dict = {}


def start() -> None:
    """Start the compile run in the background (once), at a lower priority than the tests."""
    if _RUN:
        return
    out = os.path.join(tempfile.mkdtemp(prefix="lowbit-compile-"), "reports.json")
    args = [sys.executable, "-m", "kernels.gpu_compile", "--json", out] + [f"--arch={a}" for a in ARCHS]
    if os.environ.get("LOWBIT_COMPILE_ALL", "0") == "1":
        args.append("--all")
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "0"}, stdout=log,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=lambda: os.nice(5))
    _RUN.update(proc=proc, out=out, log=log)


def finish(timeout: float = 1800) -> tuple:
    """``(path of the reports JSON, the run's output)``, waiting for the run (started here if it was not)."""
    start()
    _RUN["proc"].wait(timeout=timeout)
    _RUN["log"].seek(0)
    return _RUN["out"], _RUN["log"].read()


def stop() -> None:
    """Kill a run still going when the session ends (e.g. after ``-x`` stopped it early)."""
    proc = _RUN.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
