"""Discrete-event simulations of meshllm meshes, planner baselines and benchmarks.

Everything here drives the production `placement` and `discovery` code; nothing is copied.
"""
