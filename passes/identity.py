"""`identity`: changes nothing. Proves the load -> pipeline -> emit -> verify spine end to end.

Recipe:

    name: identity
    passes:
      - identity: {}
"""

from __future__ import annotations

from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import Pass, PassConfig, PassContext, PassResult, register_pass


class IdentityConfig(PassConfig):
    """No options."""


@register_pass
class Identity(Pass):
    name = "identity"
    description = "Changes nothing (checks the load/emit/verify path)"
    Config = IdentityConfig

    def call(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(model, modified=False, stats={"params_removed": 0})
