"""dsdpo: preference optimisation (DPO and its family) for masked diffusion language models."""

__version__ = "0.1.0"
