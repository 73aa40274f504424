"""Synthetic sensor signals for training and load-testing (see :mod:`sensorsim.signals`)."""

from sensorsim.signals import BLOCK_SIZE, VALUE_LIMIT, SensorSignal, SignalParams, generate

__all__ = ["BLOCK_SIZE", "VALUE_LIMIT", "SensorSignal", "SignalParams", "generate"]
