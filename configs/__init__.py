"""Hydra YAML configs (package so that they ship with non-editable installs)."""
