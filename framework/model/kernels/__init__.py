"""Kernels the model layer dispatches to (CPU fp32 GEMMs by row count)."""
