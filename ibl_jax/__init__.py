"""ibl_jax: a JAX/Flax re-implementation of the IBL multi-task-masking (MtM) foundation model for spiking data."""

__version__ = "0.1.0"
