"""What `make run` tells a newcomer: the walkthrough once the stack serves, and why a
service did not start (with who holds its port) when it does not.

`up` and `down` run on a private layout and free ports, as `make run` / `make stop` do on
var/ and the default ports.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.launcher import __main__ as launcher
from services.launcher.diagnose import port_holder
from services.launcher.topology import SERVICES, StackLayout
from services.launcher.walkthrough import try_it_lines
from tests.support.stack import PortReservation


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[StackLayout, dict[str, tuple[int, int, int]]]]:
    reservation = PortReservation(3 * len(SERVICES))
    numbers = iter(reservation.ports)
    ports = {name: (next(numbers), next(numbers), next(numbers)) for name in SERVICES}
    layout = StackLayout(tmp_path / "var")
    yield layout, ports
    launcher.down(layout)
    reservation.close()


def test_a_started_stack_prints_the_readme_walkthrough(
    local: tuple[StackLayout, dict[str, tuple[int, int, int]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    layout, ports = local
    assert launcher.up(layout, ports) == 0
    printed = capsys.readouterr().out.splitlines()
    for line in try_it_lines():
        assert f"  {line}" in printed


def test_a_taken_port_is_named_with_the_process_holding_it(
    local: tuple[StackLayout, dict[str, tuple[int, int, int]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    layout, ports = local
    metrics_port = ports["identity"][2]
    me = Path("/proc/self/comm").read_text().strip()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # beside the reservation
        squatter.bind(("127.0.0.1", metrics_port))
        squatter.listen()
        assert port_holder(metrics_port) == (os.getpid(), me)
        assert launcher.up(layout, ports) == 1
    err = capsys.readouterr().err
    assert (
        f"identity failed to start: metrics port {metrics_port} is in use by pid "
        f"{os.getpid()} ({me})"
    ) in err
