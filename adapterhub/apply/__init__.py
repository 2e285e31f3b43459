"""Exact apply/revert: ``patching`` (in memory: the one patch arithmetic), ``disk`` (in place on
memory-mapped safetensors, crash-safe through ``DiskTransaction``) and ``deployments`` (named model
folders with a stack of applied adapters, their events recorded through the Workspace)."""
