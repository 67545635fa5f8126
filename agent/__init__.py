"""SSH tunnel monitoring agent: local forwards to exporters bound to a host's 127.0.0.1."""

__version__ = "0.1.0"
__all__ = ["__version__"]
