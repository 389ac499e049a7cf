"""What the simulator's tests share: an HTTP session that authenticates as the module's simulator (``sim``)."""

import pytest
import requests


@pytest.fixture()
def http(sim):
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {sim.config.token}"
        yield session
