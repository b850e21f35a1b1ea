"""cowjax: Circle of Willis landmark detection in 3D MRA with JAX/Flax."""

__version__ = "0.1.0"
