"""launch/configs/shapes.yaml documents the default run: it must equal the dataclass defaults."""
from pathlib import Path

from fpo_diffusion.config_io import config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shapes_yaml_is_the_default_config():
    assert config_to_dict(load_config(ROOT / "launch" / "configs" / "shapes.yaml")) == config_to_dict(load_config())
