"""lineguard: streaming factory-line inspection."""

__version__ = "0.1.0"
