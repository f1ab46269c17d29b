from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.client.sdk import UserClient
from tests.support.stack import Stack
from tests.support.users import user_client


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Identity and session, started fresh for one test."""
    stack = Stack(tmp_path)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[UserClient]:
    client = user_client(stack)
    yield client
    client.close()
