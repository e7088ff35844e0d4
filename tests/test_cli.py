"""cli.run_cli: the project's user errors are one line and exit 2; anything else is a bug with a traceback."""
import pytest

from fpo_diffusion.checkpoint import CheckpointError
from fpo_diffusion.cli import UsageError, run_cli
from fpo_diffusion.config import ConfigError
from fpo_diffusion.config_io import load_config
from fpo_diffusion.errors import OutputExistsError, PathNotFoundError, UserError
from rewards.base import RewardConfigError, UnknownRewardError


def _raising(exc):
    def main(argv):
        raise exc
    return main


@pytest.mark.parametrize("exc", [ConfigError("train.lr must be > 0"), UsageError("bad --flag"),
                                 PathNotFoundError("model path not found: 'x'"),
                                 OutputExistsError("output folder o is not empty"),
                                 CheckpointError("no complete checkpoint in c"),
                                 UnknownRewardError("unknown reward 'nope'; available: a, b"),
                                 RewardConfigError("reward 'a': weight must be a finite number")])
def test_user_errors_are_one_line_and_exit_2(exc, capsys):
    assert run_cli(_raising(exc), [], prog="train") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train: error: {exc.args[0]}"]  # the message itself (a KeyError's is not repr-quoted)


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("a bug"), FileNotFoundError("a bug"),
                                 TypeError("a bug"), RuntimeError("a bug")])
def test_other_exceptions_are_bugs_and_propagate(exc):
    with pytest.raises(type(exc)):
        run_cli(_raising(exc), [], prog="train")


def test_user_errors_keep_the_builtin_an_api_caller_expects():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, UserError)
    assert issubclass(PathNotFoundError, FileNotFoundError) and issubclass(OutputExistsError, FileExistsError)
    assert issubclass(UnknownRewardError, KeyError) and issubclass(UnknownRewardError, RewardConfigError)
    with pytest.raises(ConfigError):
        load_config(None, ["train.nope=1"])
