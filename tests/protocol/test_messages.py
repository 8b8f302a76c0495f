"""Task messages: the selected clients travel with the round."""

import pytest

from models.protocol.messages import Task
from models.protocol.signed import SigningError


def test_a_task_names_its_selected_clients_or_none():
    task = Task(3, 2, {"lr": 0.01}, 12.5, ("a", "b"))
    back = Task.from_bytes(task.to_bytes())
    assert back == task and back.selects("a") and not back.selects("c")
    assert Task.from_bytes(Task(1, 0).to_bytes()).selects("anyone")
    with pytest.raises(SigningError, match="clients"):
        Task.from_bytes(b'{"round": 1, "model_version": 0, "clients": [1, 2]}')


def test_a_name_with_a_trailing_newline_is_refused():
    from models.errors import ConfigError
    from models.protocol.topics import Topics, check_name

    with pytest.raises(ConfigError):
        check_name("client id", "edge-a\n")
    assert Topics("fed").client_from(Topics("fed").update("edge-a") + "\n", "update") is None
