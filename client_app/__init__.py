"""Flower ClientApp of FedSpaLLM."""
