"""Mistakes a new user makes end in one line they can act on, not a traceback: an unknown
reward name (caught with the config, before Ray or a model starts), a model path that holds
nothing, a truncated newest checkpoint on `--resume` (the previous complete one is used,
saying so), and no warnings about torchvision, which raydraft leaves out on purpose."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest
from overrides import SMALL

from raydraft.cli import main
from raydraft.config import load_config
from raydraft.rewards.registry import check_reward_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The cheapest run there is: DRaFT-LV on the toy model with the color reward.
CHEAP = ["--config", "toy-draft-lv", *SMALL, "data.prompts=toy-colors"]
COLOR = "rewards.components=[{name: toy-color}]"


def one_line_error(capsys) -> str:
    """The command's stderr, which must be a single line and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_an_unknown_reward_fails_with_the_config_before_anything_starts(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), *CHEAP, "rewards.components=[{name: aesthetics}]"]
    assert main(argv) == 2  # not --local: Ray would start after validation
    err = one_line_error(capsys)
    assert "rewards.components[0].name: unknown reward 'aesthetics'; registered: " in err
    assert "aesthetic, " in err
    assert not run.exists()


def test_a_plugins_reward_is_known_to_the_check(tmp_path, monkeypatch):
    (tmp_path / "errors_reward_plugin.py").write_text(
        "from raydraft.rewards.builtin import ColorReward\n"
        "from raydraft.rewards.registry import register_reward\n"
        "register_reward('errors-plugin-color')(ColorReward)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = "rewards.components=[{name: errors-plugin-color}]"
    cfg = load_config("toy-draft-lv", ["plugins=[errors_reward_plugin]", rewards])
    check_reward_names(cfg.rewards)


def test_a_missing_diffusers_model_path_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    model = ["model.family=sd", f"model.path={missing}", "sampler.kind=ddim"]
    argv = ["train", "--local", "--run-dir", str(tmp_path / "run"), *CHEAP, COLOR, *model]
    assert main(argv) == 2
    assert one_line_error(capsys).startswith(f"raydraft: model.path {str(missing)!r}: ")


def test_a_missing_model_path_in_a_fresh_process_prints_only_its_line(tmp_path):
    """A user's view: the whole stderr of `python -m raydraft`, where transformers would warn
    that torchvision is missing as the trainer's imports reach diffusers' pipelines."""
    missing = tmp_path / "no-such-model"
    argv = ["train", "--local", "--run-dir", str(tmp_path / "run"), f"model.path={missing}"]
    done = run_python("-m", "raydraft", *argv)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "torchvision" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"raydraft: model.path {str(missing)!r}: ")
    if importlib.util.find_spec("torchvision") is None:  # the warning silenced above is real here
        warned = run_python("-c", "from transformers import CLIPImageProcessor")
        assert "requires torchvision (not installed); falling back to" in warned.stderr


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def run_with_two_checkpoints(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--local", "--max-steps", "2", "--run-dir", str(run), *CHEAP, COLOR]
    assert main([*argv, "checkpoint.every=1"]) == 0
    return run


def truncate(path, size: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:size])


def test_resume_falls_back_from_a_truncated_newest_checkpoint(
    run_with_two_checkpoints, capsys, caplog
):
    run = run_with_two_checkpoints
    checkpoints = run / "checkpoints"
    truncate(checkpoints / "step-000002" / "tensors.safetensors")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="raydraft.checkpoint"):
        assert main(["train", "--resume", str(run), "--local", "--max-steps", "2"]) == 0
    assert f"resumed {run} at step 1" in capsys.readouterr().out
    [warning] = caplog.messages
    assert warning == (
        f"{checkpoints / 'step-000002' / 'tensors.safetensors'} cannot be loaded (Error while "
        f"deserializing header: invalid header length); using {checkpoints / 'step-000001'} "
        "instead"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001", "step-000002"]


def test_resume_without_a_complete_checkpoint_is_one_line(run_with_two_checkpoints, capsys):
    run = run_with_two_checkpoints
    for step in ("step-000001", "step-000002"):
        truncate(run / "checkpoints" / step / "tensors.safetensors")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--local"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # after transformers' progress bar of the model loading
    assert last.startswith(f"raydraft: {run / 'checkpoints'}: no complete checkpoint (")
