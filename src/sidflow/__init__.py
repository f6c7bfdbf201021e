"""sidflow: Score identity Distillation (SiD) of flow-matching DiTs into 1-4 step generators.

Time convention everywhere: rectified flow, ``x_t = (1 - t) x0 + t eps``, ``t = 1`` is noise.
"""

from sidflow.core.denoiser import Cond, CondSource, Denoiser, PromptEncoder
from sidflow.errors import SidflowError

__all__ = ["Cond", "CondSource", "Denoiser", "PromptEncoder", "SidflowError", "__version__"]

__version__ = "0.1.0"
