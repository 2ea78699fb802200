"""Fixtures shared by the test modules."""

import pytest
import zmq

from tessera.transport.endpoint import _Auth


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    _Auth.stop(context)
    context.destroy(linger=0)
