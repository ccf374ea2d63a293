"""shardmail's HTTP API: REST routes under /v1, realtime push, webmail page, metrics.

Importing this package pulls in nothing heavy; :mod:`httpapi.metrics` in
particular is safe for every daemon to import (it does not import aiohttp).
"""
