"""robodiff deployment: real-time controller loop and robot I/O (see the deployment issue)."""
