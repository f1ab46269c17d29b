"""Run the identity service: `python -m services.identity`."""

from services.common.server import run
from services.identity.app import SERVICE, build

run(SERVICE, build)
