"""Flower ServerApp: validates train replies, weights recovered states, then runs FedAvg."""
