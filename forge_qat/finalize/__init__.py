"""Finalize: a trained float checkpoint to a verified low-bit artifact."""
