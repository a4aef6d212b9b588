"""Vienna sidecar I/O shell: data plane, control API, audit store, metrics, CLI."""
