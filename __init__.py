"""slimc — a compression compiler for neural networks.

    import slimc
    model = slimc.load("path/to/model")                  # HF dir, .gguf, .pt2, .onnx, trusted .pt
    model = slimc.compress(model, "flap-20")             # a recipe name or .yaml
    report = slimc.save(model, "out/", format="all")     # hf | onnx | pt2 | all, verified, atomic

Layers, top to bottom (enforced by import-linter, see ARCHITECTURE.md): `cli` -> `api` (this
namespace) -> `passes` -> `compiler` -> `runtime` -> `cuda`.
"""

from slimc._version import __version__
from slimc.api import compress, load, save
from slimc.compiler.groups import Group, Role, Slice
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import Pass, PassContext, PassManager, PassResult, register_pass
from slimc.compiler.surgery import apply_plan, mask_plan
from slimc.errors import SlimcError

__all__ = [
    "load", "save", "compress", "SlimcError", "Group", "Role", "Slice", "Model", "Pass", "PassContext", "PassManager",
    "PassResult", "register_pass", "apply_plan", "mask_plan", "__version__",
]
