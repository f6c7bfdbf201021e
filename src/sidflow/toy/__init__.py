"""Toy problems with an exact teacher: class-conditional Gaussian mixtures (2-D and image-shaped).

They prove the SiD machinery end to end without any DiT: the teacher's ``E[x0 | x_t, c]`` is known in
closed form, an MLP fitted to it initialises the fake score and the generator (as copies of a DiT
teacher do), and the energy distance to fresh mixture samples measures the distilled generator.
"""

from sidflow.toy.energy import energy_distance
from sidflow.toy.gmm import GaussianMixture, GMMCondSource, GMMDenoiser, make_mixture
from sidflow.toy.mlp import MLPDenoiser, fit_to_teacher

__all__ = [
    "GaussianMixture",
    "GMMCondSource",
    "GMMDenoiser",
    "MLPDenoiser",
    "energy_distance",
    "fit_to_teacher",
    "make_mixture",
]
