"""Framework-free engine of FedSpaLLM: models, calibration data, pruners, layer driver,
aggregation math, payload codec and evaluation. Never imports ``flwr``."""

__version__ = "0.1.0"
