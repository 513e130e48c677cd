"""Squeeze Studio's window: thin Qt screens over the `core` engine (jobs run in a worker process)."""
