"""shardmail's HTTP API: REST routes under /v1, realtime push, webmail page, metrics.

Importing this package pulls in nothing heavy.
"""
