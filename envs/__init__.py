"""Simulators, evaluation protocol and the action-chunk executor. Imports ``data`` at most; workers need no torch."""
