"""Tests that run the Flower app on Flower's deployment engine as real processes."""
