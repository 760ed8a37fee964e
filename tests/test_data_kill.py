"""SIGKILL at points of `prepare_dataset` (while encoding, before the swap, inside the --overwrite swap with and
without an exchange rename), then a rerun: the output path holds the old prepared folder, the new one, or one the
next run restores; the rerun leaves no temporary folder and its output reads back.

One driver process imports nibblora once and forks a child per step, as tests/test_checkpoint_kill.py does for
quantize and merge (the same atomic-output helper, nibblora.checkpoint.outdir, holds all three).
"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers_data import CONVERSATIONS, byte_level_tokenizer

_DRIVER = r"""
import json, os, signal, sys, time
from pathlib import Path

import nibblora.checkpoint.outdir as outdir
import nibblora.data.prepare as prepare_module
from nibblora.data import PreparedDataset, prepare_dataset

source, tokenizer, root = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
scenarios = json.loads(sys.argv[4])

def run(out, overwrite):
    prepare_dataset([source], out, tokenizer=tokenizer, template="chatml", overwrite=overwrite, progress=False)

def kill_on(owner, attr, k, after):
    original = getattr(owner, attr)
    calls = [0]
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls[0] == k and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, attr, wrapper)

TARGETS = {
    "encode": (prepare_module, "_run"),
    "swap": (prepare_module, "move_into_place"),
    "exchange": (outdir, "exchange_dirs"),
    "rename": (outdir.os, "rename"),
    "rmtree": (outdir.shutil, "rmtree"),
}

def in_child(body):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException as err:
            print(json.dumps({"child_error": f"{type(err).__name__}: {err}"}), flush=True)
            code = 1
        os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -1
        time.sleep(0.005)

def listing(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))

for i, (point, k, after, overwrite, no_exchange) in enumerate(scenarios):
    out = root / f"out{i}"
    if overwrite:
        def make_old():
            run(out, False)
            (out / "OLD").write_text("old output")
        assert in_child(make_old) == 0
    def killed_run():
        if no_exchange:
            outdir.exchange_dirs = lambda a, b: False
        kill_on(*TARGETS[point], k, after)
        run(out, overwrite)
    status = in_child(killed_run)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    after_kill = listing(out)
    def rerun():
        outdir.recover_output_dir(out)
        if overwrite:
            assert out.is_dir(), f"no output after recovery: {listing(out)}"
        if out.is_dir():
            assert len(PreparedDataset(out)) > 0
        run(out, True)
        assert listing(out) == [out.name], listing(out)
        assert not (out / "OLD").exists()
        assert len(PreparedDataset(out)) > 0
    rerun_status = in_child(rerun)
    print(json.dumps({"scenario": [point, k, after, overwrite, no_exchange], "killed": killed,
                      "after_kill": after_kill, "out_present": out.name in after_kill,
                      "rerun_ok": rerun_status == 0}), flush=True)
"""

SCENARIOS = [
    ["encode", 1, False, False, False],  # fresh output, killed while encoding
    ["encode", 1, True, True, False],  # --overwrite, killed after encoding, before the swap
    ["swap", 1, False, True, False],
    ["exchange", 1, False, True, False],
    ["exchange", 1, True, True, False],
    ["rmtree", 1, False, True, False],  # the old folder, exchanged out, being removed
    ["rename", 1, True, True, True],  # the three-rename swap, killed after each step
    ["rename", 2, True, True, True],
    ["rename", 3, True, True, True],
]


def test_sigkill_anywhere_in_prepare_leaves_a_complete_output_and_the_rerun_cleans_up(tmp_path):
    tokenizer = byte_level_tokenizer(tmp_path / "tok")
    rows = [{"messages": conversation} for conversation in CONVERSATIONS.values()] * 4
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    root = tmp_path / "outs"
    root.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(source), str(tokenizer), str(root), json.dumps(SCENARIOS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert not [r for r in results if "child_error" in r], results
    assert len(results) == len(SCENARIOS)
    for result in results:
        point, _, _, overwrite, _ = result["scenario"]
        assert result["killed"], f"{result['scenario']}: the kill point was never reached"
        if overwrite and point != "rename":
            # with an exchange rename the old or the new output is at the path at every moment
            assert result["out_present"], result
        assert result["rerun_ok"], result
