"""shardmail configuration: typed settings loaded from one TOML file."""

from conf.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings"]
