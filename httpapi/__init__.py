"""shardmail's HTTP API: REST routes under /v1, realtime push, webmail page.

Importing this package pulls in nothing heavy.
"""
