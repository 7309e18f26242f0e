"""Torch-free serving core: request types, KV-block accounting, the scheduler and the step loop.

The same objects drive the in-process engine and the gateway of the mesh.
"""
