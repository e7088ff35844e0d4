""""One line, exit 2" outside the training loop (issue 24, defect 4): export, --merge and ShapesEval."""
from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest

from fpo_diffusion.config_io import load_config

ROOT = Path(__file__).resolve().parents[1]


def trained(out: Path, family: str) -> Path:
    from fpo_diffusion.trainer import run

    run(load_config(None, [f"output_dir={out}", f"model.family={family}", f"model.path=embedded:tiny-{family}",
                           "prompts.source=embedded:tiny", "reward.weights={brightness: 1.0}", "sampling.steps=2",
                           "train.prompts_per_iteration=2", "train.group_size=2", "fpo.n_mc=2",
                           "train.minibatch_size=4", "log.image_every=0", "log.tensorboard=false",
                           "log.progress=false", "train.iterations=1"]))
    return out


@pytest.fixture
def export_cli(launch_script):
    return lambda argv: launch_script("export_lora", argv)


def test_kohya_on_an_sd3_run_is_refused_before_the_pipeline_loads(tmp_path, export_cli, monkeypatch):
    run = trained(tmp_path / "run", "sd3")
    import fpo_diffusion.export as X

    monkeypatch.setattr(X, "load_trained_policy", lambda *a, **k: pytest.fail("the pipeline was loaded"))
    rc, err = export_cli(["--run", str(run), "--out", str(tmp_path / "k"), "--format", "kohya"])
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("export_lora: error: --format kohya is for SD 1.x/2.x and SDXL LoRAs;")
    assert not (tmp_path / "k").exists()


def test_a_full_disk_during_merge_is_one_line_leaves_nothing_and_the_retry_works(tmp_path, export_cli, monkeypatch):
    run = trained(tmp_path / "run", "sd")
    from diffusers import DiffusionPipeline

    real = DiffusionPipeline.save_pretrained

    def full(self, folder, *a, **k):  # writes a first file, then the disk is full
        (Path(folder) / "vae").mkdir(parents=True, exist_ok=True)
        (Path(folder) / "vae" / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", full)
    out = tmp_path / "merged"
    rc, err = export_cli(["--run", str(run), "--out", str(out), "--merge"])
    assert rc == 2 and err == [f"export_lora: error: could not write the merged pipeline to {out}: No space left on device"]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", real)
    rc, err = export_cli(["--run", str(run), "--out", str(out), "--merge"])  # the retry is not refused as "not empty"
    assert rc == 0, err
    assert (out / "model_index.json").is_file()


def test_a_full_disk_during_a_lora_export_is_one_line(tmp_path, export_cli, monkeypatch):
    run = trained(tmp_path / "run", "sd")
    import fpo_diffusion.lora as L

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(L, "export_lora", full)
    rc, err = export_cli(["--run", str(run), "--out", str(tmp_path / "lora")])
    assert rc == 2 and err == [f"export_lora: error: could not write the LoRA to {tmp_path / 'lora'}: No space left on device"]


@pytest.mark.parametrize("damage", ["empty", "truncated", "no_file"])
def test_shapes_eval_refuses_a_damaged_lora_in_one_line(tmp_path, capsys, damage):
    sys.path.insert(0, str(ROOT / "eval"))
    import shapes as shapes_eval

    lora = tmp_path / "lora"
    lora.mkdir()
    if damage == "empty":
        (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    elif damage == "truncated":
        from safetensors.torch import save_file
        import torch

        save_file({"a": torch.zeros(64, 64)}, str(lora / "pytorch_lora_weights.safetensors"))
        data = (lora / "pytorch_lora_weights.safetensors").read_bytes()
        (lora / "pytorch_lora_weights.safetensors").write_bytes(data[:40])
    rc = shapes_eval.main(["--lora", str(lora), "--out", str(tmp_path / "out"), "--max-per-task", "1", "--images", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --lora {lora}: "), err
    assert not (tmp_path / "out").exists()


def test_shapes_eval_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "eval"))
    import shapes as shapes_eval
    from fpo_diffusion.shapes import evaluate as E

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(E, "evaluate_model", full)
    rc = shapes_eval.main(["--out", str(tmp_path / "out"), "--max-per-task", "1", "--images", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: could not write the report to --out {tmp_path / 'out'}: No space left on device"]


def test_geneval_detector_of_the_wrong_type_is_one_line(tmp_path):
    sys.path.insert(0, str(ROOT / "eval"))
    import geneval as cli
    from rewards.geneval.metadata import GenEvalInputError

    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text('{"architectures": ["CLIPModel"]}')
    for spec, says in ((str(clip), "is not a Mask2Former folder (its config.json names CLIPModel)"),
                       ("math:pi", "is a float, not a detector")):
        with pytest.raises(GenEvalInputError) as e:
            cli.load_detector(spec)
        assert says in str(e.value) and "\n" not in str(e.value)
