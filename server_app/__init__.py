"""Flower ServerApp of FedSpaLLM."""
