"""`python -m gtorrent_cli`: the same as the `gtorrent` command."""

from .app import entry

entry()
