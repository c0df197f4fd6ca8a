"""Recipes on the platform core: each a table of stages, their configs and library functions."""
