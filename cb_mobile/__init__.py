"""cb_mobile: failure-aware, quantized, deduplicated checkpoints for federated training on mobile devices."""

__version__ = "0.1.0"
