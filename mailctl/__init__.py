"""mailctl: the shardmail admin CLI (serve, check-config, domains, accounts, aliases, import)."""
