"""Flower ClientApp that simulates failing handsets and base stations."""
