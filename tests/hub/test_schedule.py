import itertools
import math

import pytest

from hub.schedule import check_schedule, round_task_config, scheduled_lr
from hub.service import HubConfig
from models.errors import ConfigError


def test_cosine_starts_at_lr_and_decays_to_the_floor():
    lrs = [scheduled_lr(1e-2, "cosine", 0.1, r, 10) for r in range(1, 11)]
    assert lrs[0] == pytest.approx(1e-2)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert lrs[5] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert min(lrs) > 1e-3
    assert scheduled_lr(1e-2, "cosine", 0.1, 11, 10) == pytest.approx(1e-3)  # past the end: the floor


def test_constant_and_unknown_end_keep_the_lr():
    assert scheduled_lr(3e-3, "constant", 0.05, 7, 10) == 3e-3
    config = {"lr": 3e-3, "lr_schedule": "cosine", "lr_min_factor": 0.05, "epochs": 2}
    task = round_task_config(config, 11, 20)
    assert task["epochs"] == 2 and task["lr"] == pytest.approx(scheduled_lr(3e-3, "cosine", 0.05, 11, 20), rel=1e-5)
    assert config["lr"] == 3e-3  # the hub's own config is not touched


@pytest.mark.parametrize("config, rounds, match", [
    ({"lr_schedule": "step"}, 5, "unknown lr_schedule"),
    ({"lr_schedule": "cosine", "lr_min_factor": 2.0}, 5, "lr_min_factor"),
    ({"lr_schedule": "cosine"}, None, "set --rounds"),
])
def test_bad_schedules_are_refused(config, rounds, match):
    with pytest.raises(ConfigError, match=match):
        check_schedule(config, rounds)


def test_hub_config_checks_the_schedule(tmp_path):
    with pytest.raises(ConfigError, match="set --rounds"):
        HubConfig("mqtt://127.0.0.1:1883", "fed", tmp_path, task_config={"lr_schedule": "cosine"})
    config = HubConfig("mqtt://127.0.0.1:1883", "fed", tmp_path, rounds=4, task_config={"lr_schedule": "cosine"})
    assert config.task_config["lr_schedule"] == "cosine"
