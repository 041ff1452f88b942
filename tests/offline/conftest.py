import pytest

from offline.logs import Logs, validate_table
from offline.simulate import simulate_logs
from offline.train import TrainConfig, TrainResult, train
from offline.world import WorldConfig


@pytest.fixture(scope="session")
def tiny_logs() -> Logs:
    return validate_table(simulate_logs(WorldConfig(users=300, rounds=5, seed=0)))


@pytest.fixture(scope="session")
def tiny_model(tiny_logs: Logs) -> TrainResult:
    return train(tiny_logs, TrainConfig(epochs=2, d_model=32, context_length=4), progress=False)
