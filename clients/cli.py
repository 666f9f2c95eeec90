"""`prefixctl`: upload, inspect and delete prefixes, manage tenant API keys, drain a replica for
maintenance, and generate, from the shell.

Server errors print `error <code>: <message>` on stderr and exit 1; usage errors exit 2.
"""

from clients import cli_admin, cli_generate, cli_prefixes  # noqa: F401  # they add their commands
from clients.cli_app import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
