"""The run's TensorBoard logs hold the resolved config as text next to the scalars."""
from fpo_diffusion.config_io import config_to_dict, load_config
from fpo_diffusion.tracking import RunLogger


def _event_data(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    return ea


def test_resolved_config_is_text_in_tensorboard(tmp_path):
    cfg = load_config(None, ["train.lr=0.00123", "reward.weights.remote:http://127.0.0.1:8765=1.0"])
    log = RunLogger(tmp_path, config=config_to_dict(cfg))
    log.log({"reward/mean": 0.5}, 0)
    log.close()
    ea = _event_data(tmp_path / "tb")
    assert "config/text_summary" in ea.Tags()["tensors"] and "reward/mean" in ea.Tags()["scalars"]
    (event,) = ea.Tensors("config/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    import yaml

    body = yaml.safe_load("\n".join(line[4:] for line in text.splitlines() if line.startswith("    ")))
    assert body == config_to_dict(cfg)  # the whole resolved config, readable back
    assert body["train"]["lr"] == 0.00123 and event.step == 0


def test_no_config_no_text(tmp_path):
    log = RunLogger(tmp_path)
    log.log({"reward/mean": 0.5}, 0)
    log.close()
    assert "config/text_summary" not in _event_data(tmp_path / "tb").Tags()["tensors"]
