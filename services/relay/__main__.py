"""Run the relay: `python -m services.relay`."""

from services.common.server import run
from services.relay.app import SERVICE, build

run(SERVICE, build)
