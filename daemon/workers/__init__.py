"""The worker side of SPEC section 5: the atomic pull, the worker loop, adapters, the scanner."""
