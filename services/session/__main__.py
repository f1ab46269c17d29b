"""Run the session service: `python -m services.session`."""

from services.common.server import run
from services.session.app import SERVICE, build

run(SERVICE, build)
