"""Checkpoint and run-folder files under failure (issue 17, items 3, 5, 6), without training.

* the run-folder lock: a second live process is refused with one line naming it; a lock left by a
  process that died (``kill -9``) is taken over with a line saying so;
* ``save_checkpoint`` refuses non-finite weights / optimizer state / EMA, turns every way a full
  disk surfaces (``OSError``, ``torch.save``'s ``RuntimeError``, safetensors' ``SafetensorError``)
  into one ``CheckpointError`` line with the partial folder removed, and cleans what interrupted
  writes left (``.tmp-``, ``.old-``) after the next successful write;
* ``verify_checkpoint`` / ``resolve_resume`` name a damaged file, and ``latest`` falls back to the
  newest intact checkpoint, saying which it skipped and why;
* the JSONL logs never keep a torn row: a failed append is cut back (a real short write, forced
  with ``RLIMIT_FSIZE`` in a subprocess), a torn tail is dropped on resume with a note.

A minimal accelerator stands in for accelerate's (one process); the trainer-level tests are in
``test_reliability_run.py``.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import fpo_diffusion.checkpoint as ck
from fpo_diffusion.checkpoint import (CheckpointError, NonfiniteStateError, clean_leftovers, list_checkpoints,
                                      resolve_resume, save_checkpoint, verify_checkpoint)
from fpo_diffusion.run_lock import RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]


class OneProcess:
    """What ``save_checkpoint`` uses of an ``Accelerator``, for one process; ``save_state`` writes a LoRA
    file through the same hook as the real one and an optimizer file through ``torch.save``."""

    is_main_process = True
    device = torch.device("cpu")

    def __init__(self):
        self.model = torch.nn.Linear(3, 2)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.model(torch.ones(1, 3)).sum().backward()
        self.opt.step()
        self._models, self._optimizers = [self.model], [self.opt]

    def unwrap_model(self, m):
        return m

    def wait_for_everyone(self):
        pass

    def gather(self, t):
        return t

    def save_state(self, folder):
        os.makedirs(folder, exist_ok=True)
        ck.save_file({n: p.detach().clone() for n, p in self.model.named_parameters()},
                     os.path.join(folder, "lora.safetensors"))
        torch.save(self.opt.state_dict(), os.path.join(folder, "optimizer.bin"))


def save(acc, root, i, **kw):
    return save_checkpoint(acc, root, i, {"iteration": i}, kw.pop("extra", None), keep_last=kw.pop("keep_last", 10))


# ---------------------------------------------------------------- non-finite state is never written

@pytest.mark.parametrize("where", ["weights", "optimizer", "ema"])
def test_non_finite_state_is_refused_and_nothing_is_written(tmp_path, where):
    acc, root = OneProcess(), tmp_path / "checkpoints"
    first = save(acc, root, 1)
    extra = {"ema.safetensors": {"0": torch.zeros(2)}}
    with torch.no_grad():
        if where == "weights":
            acc.model.weight[0, 0] = float("inf")
        elif where == "optimizer":
            next(iter(acc.opt.state.values()))["exp_avg_sq"].fill_(float("nan"))
        else:
            extra["ema.safetensors"]["0"][1] = float("nan")
    with pytest.raises(NonfiniteStateError) as e:
        save(acc, root, 2, extra=extra)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("refusing to write checkpoint checkpoint-000002: ") \
        and "non-finite" in msg and msg.endswith("earlier checkpoints are intact")
    assert sorted(p.name for p in root.iterdir()) == [first.name]


# ---------------------------------------------------------------- disk full, however it surfaces

def _fail_after_some_bytes(path, exc):
    with open(path, "wb") as f:
        f.write(b"\x00" * 17)
    raise exc


@pytest.mark.parametrize("how,reason", [
    ("safetensors", "No space left on device"),
    ("torch_basic_ios", "basic_ios::clear: iostream error (a failed write: is the disk full?)"),
    ("torch_stream_writer", "PytorchStreamWriter failed writing file data/0: file write failed (a failed write"),
    ("oserror", "No space left on device"),
])
def test_disk_full_in_any_writer_is_one_line_and_leaves_no_partial_folder(tmp_path, monkeypatch, how, reason):
    acc, root = OneProcess(), tmp_path / "checkpoints"
    first = save(acc, root, 1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    if how == "safetensors":  # what safetensors 0.4-0.8 raise on ENOSPC
        err = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(ck, "save_file", lambda t, p, *a, **k: _fail_after_some_bytes(p, err))
    else:
        err = {"torch_basic_ios": RuntimeError("basic_ios::clear: iostream error"),
               "torch_stream_writer": RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                                                   "failed writing file data/0: file write failed"),
               "oserror": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))}[how]
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: _fail_after_some_bytes(f, err))
    with pytest.raises(CheckpointError) as e:
        save(acc, root, 2)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"could not write checkpoint checkpoint-000002: {reason}"), msg
    assert msg.endswith("earlier checkpoints are intact")
    assert sorted(p.name for p in root.iterdir()) == [first.name]  # no .tmp- folder
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert resolve_resume("latest", root) == first


def test_write_failure_reason_from_each_library():
    assert ck.write_failure(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    assert ck.write_failure(SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                            "message: \"No space left on device\" })")).startswith("Error while")
    assert ck.write_failure(SafetensorError("I/O error: File too large (os error 27)")) == os.strerror(27)


def test_leftovers_of_interrupted_writes_are_cleaned_after_the_next_successful_write(tmp_path):
    acc, root = OneProcess(), tmp_path / "checkpoints"
    save(acc, root, 1)
    save(acc, root, 3)
    # what kills between the steps of earlier writes left behind:
    (root / ".tmp-checkpoint-000002").mkdir()  # a write cut short
    (root / ".tmp-checkpoint-000002" / "optimizer.bin").write_bytes(b"\x00" * 10)
    (root / "checkpoint-000001").rename(root / ".old-checkpoint-000001")  # the only copy of 1, moved aside
    save(acc, root, 1)  # ... and then 1 was written again
    (root / "checkpoint-000003").rename(root / ".old-checkpoint-000003")  # the only copy of 3
    (root / ".old-checkpoint-000009").mkdir()  # incomplete
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-000001", ".old-checkpoint-000003"]
    save(acc, root, 4)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-000001", "checkpoint-000003", "checkpoint-000004"]
    assert clean_leftovers(root) == []


# ---------------------------------------------------------------- damaged checkpoints

def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else data[:-3] + b"XYZ")


@pytest.mark.parametrize("name", ["lora.safetensors", "optimizer.bin", "ema.safetensors"])
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_latest_skips_a_damaged_checkpoint_and_says_which_and_why(tmp_path, name, how):
    acc, root = OneProcess(), tmp_path / "checkpoints"
    extra = {"ema.safetensors": {"0": torch.ones(2)}}
    first, second = save(acc, root, 1, extra=extra), save(acc, root, 2, extra=extra)
    assert verify_checkpoint(second)["iteration"] == 2
    _damage(second / name, how)
    lines = []
    assert resolve_resume("latest", root, report=lines.append) == first
    why = "is truncated or damaged" if how == "truncate" else "is damaged (its SHA-256 differs"
    assert len(lines) == 1 and lines[0].startswith(f"warning: skipping damaged checkpoint checkpoint-000002: {name} {why}")
    with pytest.raises(CheckpointError) as e:  # named explicitly: one line naming the file
        resolve_resume(str(second), root)
    assert "\n" not in str(e.value) and f"checkpoint {second} is damaged: {name}" in str(e.value)
    _damage(first / name, how)
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        resolve_resume("latest", root, report=None)


def test_a_checkpoint_without_a_file_list_is_still_checked_by_loading_its_weights(tmp_path):
    acc, root = OneProcess(), tmp_path / "checkpoints"
    first, second = save(acc, root, 1), save(acc, root, 2)
    for c in (first, second):  # as written before files were listed
        st = json.loads((c / ck.STATE_FILE).read_text())
        st.pop("files")
        (c / ck.STATE_FILE).write_text(json.dumps(st))
    _damage(second / "lora.safetensors", "truncate")
    lines = []
    assert resolve_resume("latest", root, report=lines.append) == first
    assert "lora.safetensors cannot be read" in lines[0]
    save_file({"w": torch.tensor([float("nan")])}, str(first / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="lora.safetensors holds non-finite values"):
        verify_checkpoint(first)


# ---------------------------------------------------------------- one writer per run folder

HOLD = """
import sys, time
from fpo_diffusion.run_lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()  # hold it until killed or stdin closes
lock.release()
"""


def _holder(folder: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    p = _holder(run)
    try:
        with pytest.raises(RunLockedError) as e:
            RunLock(run, report=None).acquire()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"run folder {run} is in use by another training process (pid {p.pid} ")
        assert json.loads((run / ".lock").read_text())["pid"] == p.pid
    finally:
        p.kill()  # SIGKILL: no cleanup, the lock file still names it
        p.wait()
    assert p.returncode == -signal.SIGKILL and json.loads((run / ".lock").read_text())["pid"] == p.pid
    notes = []
    lock = RunLock(run, report=notes.append).acquire()
    assert len(notes) == 1 and notes[0].startswith(f"note: {run} had a stale lock of pid {p.pid} on ")
    assert notes[0].endswith("which is no longer running; taking it over")
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    # released (by a process that ends normally): taken without a stale note
    p = _holder(run)
    p.stdin.close()
    p.wait()
    notes = []
    with RunLock(run, report=notes.append):
        assert notes == []


def test_a_lock_that_created_the_folder_leaves_nothing_when_released(tmp_path):
    run = tmp_path / "new" / "run"
    with RunLock(run, report=None) as lock:
        assert lock.held and (run / ".lock").exists()
    assert not run.exists()


# ---------------------------------------------------------------- JSONL logs never keep a torn row

def test_a_torn_tail_of_the_logs_is_dropped_on_resume_with_a_note(tmp_path, capsys):
    from fpo_diffusion.tracking import RunLogger

    good = [json.dumps({"iteration": i, "reward/mean": 0.5}) for i in range(3)]
    (tmp_path / "metrics.jsonl").write_bytes(("\n".join(good) + "\n").encode() + b'{"iteration": 3, "rew')
    (tmp_path / "samples.jsonl").write_bytes(("\n".join(good) + "\n").encode() + b"\x00" * 40 + b"\xff\xfe\n")
    log = RunLogger(tmp_path, tensorboard=False)
    log.truncate_after(2)
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert (tmp_path / name).read_text() == "\n".join(good[:2]) + "\n"
    out = capsys.readouterr().out
    assert "note: metrics.jsonl: dropped 1 torn row" in out and "note: samples.jsonl: dropped 1 torn row" in out
    log.log({"reward/mean": 0.25}, 2)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"iteration": 2, "reward/mean": 0.25}


SHORT_WRITE = """
import json, resource, signal, sys
from pathlib import Path
from fpo_diffusion.checkpoint import WriteError
from fpo_diffusion.tracking import append_jsonl
path = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as ENOSPC would
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100, resource.RLIM_INFINITY))
try:
    append_jsonl(path, [{"iteration": 1, "prompt": "x" * 1000}])
except WriteError as e:
    print("error:", e)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_a_failed_append_is_cut_back_to_the_last_whole_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 0}\n')
    p = subprocess.run([sys.executable, "-c", SHORT_WRITE, str(path)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=900)  # generous: a loaded CI machine
    assert p.stdout.strip() == "error: could not write metrics.jsonl: File too large", p.stdout + p.stderr
    assert path.read_text() == '{"iteration": 0}\n'
