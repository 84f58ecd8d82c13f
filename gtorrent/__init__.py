"""gtorrent: a peer client, like BitTorrent, for serving large language models from contributed computers.

The library never imports typer or rich; the command-line interface lives in `gtorrent_cli`.
"""

__version__ = "0.1.0"
