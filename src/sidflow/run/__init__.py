"""The run layer: small collaborators around one training loop.

``presets`` and ``registry`` (what can run, and where plugins plug in), ``distributed`` (torchrun
set-up, FSDP2), ``build`` (networks, trainer, resume), ``loop`` (the loop itself), ``checkpoint``
and ``selection`` (what is kept), ``logging``, ``report`` and ``export`` (what a run leaves behind),
``artifacts`` (using a finished run).
"""

__all__: list[str] = []
