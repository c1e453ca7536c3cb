"""Simulation drivers: the FedAvg comparison, the codec benchmark and their plots."""
