"""Vienna sidecar pure policy core: values in, values out — no I/O, no clock, no randomness."""
