from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stack import Stack
from tests.support.users import Client

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Identity and session, started fresh for one test."""
    stack = Stack(tmp_path)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    client = Client(stack)
    yield client
    client.close()
