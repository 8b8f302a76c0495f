"""wearfl: federated on-device learning for wearables. This package holds the CLI."""

__version__ = "0.1.0"
