"""The pure core: one time convention, the SiD losses, guidance, the generator and teacher samplers,
keyed randomness and the Denoiser contract. Tensor functions only; nothing here imports another room.
"""

from sidflow.core.denoiser import Cond, CondSource, Denoiser, FeatureDenoiser, PromptEncoder

__all__ = ["Cond", "CondSource", "Denoiser", "FeatureDenoiser", "PromptEncoder"]
