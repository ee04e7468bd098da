"""load_weights refuses a checkpoint of another model as a user error (one line from the CLI, exit 2)."""

import pytest
import torch

from tml.core.checkpoint import Checkpointer, load_weights
from tml.core.distributed import init_distributed, shutdown
from tml.core.errors import is_user_error
from tml.core.state import ModelState

pytestmark = pytest.mark.unit


def test_a_checkpoint_of_another_model_is_a_user_error_naming_the_tensor(tmp_path):
    env = init_distributed("gloo", "cpu")
    try:
        Checkpointer(str(tmp_path), env, {"model": ModelState(torch.nn.Linear(4, 2))}).save(1)
        assert load_weights(torch.nn.Linear(4, 2), str(tmp_path)) == 1
        with pytest.raises(
            Exception, match=r"does not fit the config's model: weight: saved \[2, 4\], model \[2, 3\]"
        ) as error:
            load_weights(torch.nn.Linear(3, 2), str(tmp_path))
        assert is_user_error(error.value)
    finally:
        shutdown()
