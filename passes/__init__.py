"""The shipped passes, one algorithm per module; importing this package registers them all.

Each module defines a `Pass` subclass decorated with `register_pass`; its pure maths lives in a
private `_<name>_math.py` beside it.
"""

from slimc.passes import cfsp, flap, group_magnitude, hesso, identity, llm_prune, magnitude, nirvana, nm, spa

__all__ = ["cfsp", "flap", "group_magnitude", "hesso", "identity", "llm_prune", "magnitude", "nirvana", "nm", "spa"]
