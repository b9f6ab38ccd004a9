"""calib.learn_prompts and calib.generate on bad input: exit status 2, one ``error: ...`` line, no traceback, nothing
written. Each case runs the real command line in its own process; all processes start together (one fixture) so
the import cost is paid concurrently. Offline: ``HF_HUB_OFFLINE=1``, or a hub endpoint that refuses connections."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calib.common import atomic_torch_save, imagenet_info

ROOT = Path(__file__).resolve().parents[2]
NAMES = imagenet_info().label_names()
OFFLINE = {"HF_HUB_OFFLINE": "1"}
REFUSED = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}  # discard port: nothing listens


def _fake_sd(folder: Path) -> Path:
    """A folder that passes the cheap --sd-path check (so the classifier is what fails)."""
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    return folder


def _cases(t: Path) -> dict:
    """id -> (module, argv, env, fragments expected in the error line, path that must not appear or must be
    unchanged)."""
    (t / "empty").mkdir()
    sd = _fake_sd(t / "sd")
    prompts = t / "prompts"
    atomic_torch_save({"prompts": torch.zeros(2, 20, 16)}, prompts / f"{NAMES[0]}.pt")
    (t / "a_file").write_text("x")
    lp, gen = "calib.learn_prompts", "calib.generate"
    return {
        "lp-classifier-offline": (lp, ["--sd-path", str(sd), "--out", str(t / "o1")], OFFLINE,
                                  ["could not load classifier", "--checkpoint"], t / "o1"),
        "lp-classifier-hub-refused": (lp, ["--model", "vit_s", "--sd-path", str(sd), "--out", str(t / "o2")],
                                      REFUSED, ["could not load classifier", "not reachable"], t / "o2"),
        "lp-sd-missing": (lp, ["--out", str(t / "o3")], OFFLINE,
                          ["--sd-path 'stabilityai/sd-turbo'", "not reachable", "--sd-path /path/to/sd-turbo"],
                          t / "o3"),
        "lp-bad-classes": (lp, ["--classes", "0,goldfish", "--out", str(t / "o4")], OFFLINE,
                           ["--classes", "'goldfish'", "wnid"], t / "o4"),
        "lp-out-exists": (lp, ["--out", str(t / "a_file")], OFFLINE, ["--out", "a_file", "not a folder"],
                          t / "a_file"),
        "gen-sd-missing": (gen, ["--baseline", "--per-class", "1", "--classes", "0", "--sd-path", str(t / "no_sd"),
                                 "--out", str(t / "g1")], OFFLINE, ["--sd-path", "no_sd", "does not exist"], t / "g1"),
        "gen-sd-hub-offline": (gen, ["--baseline", "--per-class", "1", "--classes", "0", "--out", str(t / "g2")],
                               OFFLINE, ["'stabilityai/sd-turbo'", "not reachable"], t / "g2"),
        "gen-prompts-missing": (gen, ["--prompts", str(t / "nowhere"), "--per-class", "1", "--out", str(t / "g3")],
                                OFFLINE, ["--prompts", "nowhere", "not a folder"], t / "g3"),
        "gen-prompts-empty": (gen, ["--prompts", str(t / "empty"), "--per-class", "1", "--out", str(t / "g4")],
                              OFFLINE, ["--prompts", "no learned prompt files", "calib.learn_prompts"], t / "g4"),
        "gen-prompts-lack-class": (gen, ["--prompts", str(prompts), "--classes", "0-1", "--per-class", "1", "--out",
                                         str(t / "g5")], OFFLINE, [f"{NAMES[1]}.pt", "--classes"], t / "g5"),
        "gen-bad-classes": (gen, ["--baseline", "--classes", "1000", "--per-class", "1", "--out", str(t / "g6")],
                            OFFLINE, ["--classes", "[1000]", "0..999"], t / "g6"),
        "gen-out-exists": (gen, ["--baseline", "--per-class", "1", "--out", str(t / "a_file")], OFFLINE,
                           ["--out", "a_file", "not a folder"], t / "a_file"),
    }


def _snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


CASE_IDS = ["lp-classifier-offline", "lp-classifier-hub-refused", "lp-sd-missing", "lp-bad-classes", "lp-out-exists",
            "gen-sd-missing", "gen-sd-hub-offline", "gen-prompts-missing", "gen-prompts-empty",
            "gen-prompts-lack-class", "gen-bad-classes", "gen-out-exists"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every case's process at once; yields id -> (case, Popen, snapshot of its output path before)."""
    t = tmp_path_factory.mktemp("cli_errors")
    cases = _cases(t)
    assert sorted(cases) == sorted(CASE_IDS)
    before = {cid: _snapshot(c[4]) for cid, c in cases.items()}
    procs = {}
    for cid, (module, argv, env, _, _) in cases.items():
        e = {**os.environ, **env}
        e = {k: v for k, v in e.items() if v != ""}
        procs[cid] = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=ROOT, env=e, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield {cid: (cases[cid], p, before[cid]) for cid, p in procs.items()}
    for p in procs.values():
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("cid", CASE_IDS)
def test_cli_bad_input_is_one_error_line(runs, cid):
    (module, argv, env, fragments, out), proc, before = runs[cid]
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, (proc.returncode, stderr[-3000:])
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert _snapshot(out) == before  # nothing created, nothing changed
    leftovers = [p.name for p in out.parent.iterdir() if ".partial" in p.name or ".tmp" in p.name]
    assert not leftovers, leftovers
