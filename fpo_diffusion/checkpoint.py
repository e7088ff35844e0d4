"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``<output_dir>/checkpoints/checkpoint-<iteration:06d>`` written
first under a temporary name (``.tmp-checkpoint-...``) and renamed only when complete;
``trainer_state.json`` is its last file, so a folder without it is never a checkpoint
and ``latest`` only ever names a complete one. Inside: ``accelerator.save_state`` output
(optimizer, RNG states of every rank, registered objects such as the LR scheduler) with
the model saved as its LoRA weights only (``lora.safetensors``), plus ``ema.safetensors``
when EMA is on.

Reliability (issue 17):

* **Verified on load.** ``trainer_state.json`` lists every file of the checkpoint with its size
  and SHA-256 (``files``); :func:`verify_checkpoint` checks them and that the LoRA / EMA weights
  are finite. ``--resume latest`` (:func:`resolve_resume`) skips a damaged checkpoint for the
  newest intact one and says which it skipped and why; an explicit path that is damaged is one
  line naming the file.
* **Nothing non-finite is written.** :func:`save_checkpoint` refuses weights, EMA or optimizer
  state holding NaN/Inf (:class:`NonfiniteStateError`).
* **A failed write is one line.** Disk full surfaces as ``OSError`` from Python, ``RuntimeError``
  from ``torch.save`` and ``SafetensorError`` from safetensors; all become :class:`CheckpointError`,
  the partial folder is removed and earlier checkpoints stay intact. ``.tmp-`` / ``.old-``
  leftovers of interrupted writes are cleaned after the next successful write.

One writer per run folder is ``run_lock.RunLock``'s job.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import faults

STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_OLD = re.compile(r"^\.old-checkpoint-(\d+)$")  # a complete checkpoint moved aside while being replaced
_TMP = re.compile(r"^\.tmp-checkpoint-(\d+)$")  # a checkpoint being written
#: The errors a failed write surfaces as: Python's own, ``torch.save``'s (``RuntimeError: basic_ios::clear``,
#: ``PytorchStreamWriter failed writing file``) and safetensors' (``SafetensorError: ... (os error 28)``).
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, SafetensorError)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


class NonfiniteStateError(CheckpointError):
    """Refused to write weights, EMA or optimizer state that hold NaN/Inf."""


class WriteError(CheckpointError):
    """A file of the run could not be written (disk full, quota, permissions...)."""


def write_failure(e: BaseException) -> str:
    """One line saying why a write failed, whichever library raised it."""
    if isinstance(e, OSError) and e.errno:
        return e.strerror or os.strerror(e.errno)
    text = " ".join(str(e).split())
    m = re.search(r"os error (\d+)", text)
    if m:
        return os.strerror(int(m.group(1)))
    if isinstance(e, RuntimeError) and not isinstance(e, CheckpointError):  # torch.save's C++ stream errors
        text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)
        return f"{text[:200]} (a failed write: is the disk full?)"
    return text[:300] or type(e).__name__


@contextlib.contextmanager
def writing(what: str, partial: str | Path | None = None) -> Iterator[None]:
    """Turn a failed write inside the block into one-line :class:`WriteError` naming ``what``; remove
    ``partial`` (a file or folder the block was creating) so no half-written copy is left."""
    try:
        yield
    except WRITE_ERRORS as e:
        if isinstance(e, CheckpointError):
            raise
        if partial is not None:
            p = Path(partial)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise WriteError(f"could not write {what}: {write_failure(e)}") from None


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in root.iterdir():
        m = _NAME.match(p.name) or _OLD.match(p.name)
        if m and is_checkpoint(p) and (int(m.group(1)) not in found or _NAME.match(p.name)):
            # A process killed between the two renames that replace checkpoint-N leaves the old complete
            # folder as .old-checkpoint-N and no checkpoint-N: it still counts (the plain name wins).
            found[int(m.group(1))] = p
    return [found[i] for i in sorted(found)]


def say_once(line: str) -> None:
    """Print ``line`` to stderr from the first rank only (``RANK`` is set by the launchers)."""
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per rank
        print(line, file=sys.stderr, flush=True)


def resolve_resume(resume: str, root: str | Path, *, report: Callable[[str], None] | None = say_once) -> Path:
    """``latest`` or a path -> a complete, intact checkpoint folder, else :class:`CheckpointError`.

    ``latest`` is the newest checkpoint that passes :func:`verify_checkpoint`; each newer one that
    does not is skipped with a line to ``report`` saying which and why.
    """
    if resume == "latest":
        ckpts = list_checkpoints(root)
        if not ckpts:
            raise CheckpointError(f"--resume latest: no complete checkpoint in {root}")
        skipped = []
        for path in reversed(ckpts):
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                skipped.append(str(e))
                if report is not None:
                    report(f"warning: skipping damaged checkpoint {path.name}: {e}")
                continue
            return path
        raise CheckpointError(f"--resume latest: every checkpoint in {root} is damaged (newest: {skipped[0]})")
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume path {path} does not exist or is not a folder")
    if not is_checkpoint(path):
        raise CheckpointError(f"resume path {path} is not a checkpoint (no {STATE_FILE})")
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {e}; resume from another one (--resume latest "
                              f"picks the newest intact one)") from None
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``folder`` (but the state file)."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def _nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in tensors.items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def verify_checkpoint(path: str | Path) -> dict:
    """The checkpoint's state after checking that every file it lists is there, whole and unchanged,
    and that its LoRA / EMA weights are finite; :class:`CheckpointError` (naming the file) otherwise.

    Checkpoints written before files were listed are checked by loading their safetensors files."""
    path = Path(path)
    state = read_state(path)
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int):
        raise CheckpointError(f"{STATE_FILE} does not hold a checkpoint's state")
    files = state.get("files")
    if isinstance(files, dict):
        for name, meta in files.items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{name} is missing")
            size = f.stat().st_size
            if size != meta.get("size"):
                raise CheckpointError(f"{name} is truncated or damaged ({size} bytes, written as {meta.get('size')})")
            if _sha256(f) != meta.get("sha256"):
                raise CheckpointError(f"{name} is damaged (its SHA-256 differs from the one written)")
    for name in sorted(p.name for p in path.glob("*.safetensors")):
        try:
            tensors = load_file(str(path / name))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{name} cannot be read: {' '.join(str(e).split())[:200]}") from None
        bad = _nonfinite_tensors(tensors)
        if bad:
            raise CheckpointError(f"{name} holds non-finite values ({len(bad)} of {len(tensors)} tensors, e.g. {bad[0]})")
    return state


def read_state(path: str | Path) -> dict:
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE}: {e}") from None


def named_trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into the model's trainable (LoRA) parameters; every one of them must be there."""
    params = named_trainable(model)
    missing = sorted(set(params) - set(state))
    if missing:
        raise CheckpointError(f"{where} lacks LoRA weights such as {missing[0]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.dtype))


def install_lora_only_hooks(accelerator, lora_file: str = "lora.safetensors") -> None:
    """Make ``save_state``/``load_state`` store only the trainable (LoRA) weights of the model."""

    def save_hook(models, weights, output_dir):
        for i, m in enumerate(models):
            params = named_trainable(accelerator.unwrap_model(m))
            save_file({n: p.detach().float().cpu().contiguous() for n, p in params.items()},
                      os.path.join(output_dir, lora_file if i == 0 else f"lora_{i}.safetensors"))
        weights.clear()  # nothing else of the (frozen) model is written

    def load_hook(models, input_dir):
        for i in range(len(models)):
            m = accelerator.unwrap_model(models.pop())
            load_trainable(m, load_file(os.path.join(input_dir, lora_file if i == 0 else f"lora_{i}.safetensors")),
                           f"checkpoint {input_dir}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _nonfinite_state(accelerator, extra: dict[str, dict[str, torch.Tensor]] | None) -> str | None:
    """What of this rank's trainable weights, optimizer state or ``extra`` tensors is non-finite, if any."""
    for m in getattr(accelerator, "_models", []):
        bad = _nonfinite_tensors(named_trainable(accelerator.unwrap_model(m)))
        if bad:
            return f"the LoRA weights hold non-finite values ({len(bad)} tensors, e.g. {bad[0]})"
    for opt in getattr(accelerator, "_optimizers", []):
        for i, st in opt.state_dict().get("state", {}).items():
            bad = _nonfinite_tensors({f"{i}.{k}": v for k, v in st.items()})
            if bad:
                return f"the optimizer state holds non-finite values (e.g. parameter {bad[0]})"
    for name, tensors in (extra or {}).items():
        bad = _nonfinite_tensors(tensors)
        if bad:
            return f"{name} would hold non-finite values ({len(bad)} tensors, e.g. {bad[0]})"
    return None


def clean_leftovers(root: str | Path) -> list[str]:
    """Remove what interrupted writes left under ``root`` (``.tmp-`` folders; ``.old-`` folders whose
    checkpoint exists again); a complete ``.old-checkpoint-N`` that is the only copy of iteration N
    gets its name back. Returns the names removed. Called after a successful write."""
    root, removed = Path(root), []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        old = _OLD.match(p.name)
        if _TMP.match(p.name) or (old and (is_checkpoint(root / f"{PREFIX}{old.group(1)}") or not is_checkpoint(p))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        elif old:
            p.rename(root / f"{PREFIX}{old.group(1)}")
    return removed


def save_checkpoint(accelerator, root: str | Path, iteration: int, state: dict,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None, keep_last: int = 2) -> Path:
    """Write a checkpoint atomically (every rank must call this); prune to ``keep_last`` (0: keep all).

    ``extra`` maps file names to tensor dicts written by the main process (e.g. EMA). Weights,
    optimizer state or ``extra`` holding NaN/Inf are refused (:class:`NonfiniteStateError`). On a
    failed write (disk full: ``OSError``, ``torch.save``'s ``RuntimeError``, ``SafetensorError``) on any
    rank the temporary folder is removed, earlier checkpoints stay intact, and every rank raises
    :class:`CheckpointError` with one line. ``trainer_state.json`` (written last) lists every file with
    its size and SHA-256 for :func:`verify_checkpoint`. After a successful write, leftovers of
    interrupted ones are removed (:func:`clean_leftovers`).
    """
    root = Path(root)
    final = root / f"{PREFIX}{iteration:06d}"
    tmp = root / f".tmp-{PREFIX}{iteration:06d}"
    error: str | None = None
    nonfinite = False
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    error = _nonfinite_state(accelerator, extra if accelerator.is_main_process else None)
    nonfinite = error is not None
    if error is None:
        try:
            accelerator.save_state(str(tmp))
        except WRITE_ERRORS as e:
            error = write_failure(e)
    accelerator.wait_for_everyone()  # every rank's files are in tmp
    if accelerator.is_main_process and error is None:
        try:
            for name, tensors in (extra or {}).items():
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name))
            faults.hit("checkpoint_write")
            state = {**state, "files": _manifest(tmp)}
            with open(tmp / STATE_FILE, "w") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
        except WRITE_ERRORS as e:
            error = write_failure(e)
    failed = accelerator.gather(torch.tensor([float(error is not None)], device=accelerator.device))
    if bool(failed.max() > 0):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        if nonfinite:
            raise NonfiniteStateError(f"refusing to write checkpoint {final.name}: {error}; earlier checkpoints "
                                      f"are intact")
        raise CheckpointError(f"could not write checkpoint {final.name}: {error or 'another process failed to write its part'}; "
                              f"earlier checkpoints are intact")
    if accelerator.is_main_process:
        faults.hit("checkpoint_rename")
        if final.exists():  # the same iteration saved again (e.g. after a resume): replace atomically
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            faults.hit("checkpoint_replace")
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
        clean_leftovers(root)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_extra(path: str | Path, name: str) -> dict[str, torch.Tensor] | None:
    f = Path(path) / name
    return load_file(str(f)) if f.exists() else None
