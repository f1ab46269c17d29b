"""Run the audit service: `python -m services.audit`."""

from services.audit.app import SERVICE, build
from services.common.server import run

run(SERVICE, build)
