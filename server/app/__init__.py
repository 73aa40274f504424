"""Wiring and process life: the `lstm-serve` command, building the server, running and draining it."""
