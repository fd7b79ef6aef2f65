"""slimc — a compression compiler for neural networks.

    import slimc
    model = slimc.load("path/to/model")                  # HF dir, .gguf, .pt2, .onnx, trusted .pt
    model = slimc.compress(model, "flap-20")             # a recipe name or .yaml; or run a PassManager
    report = slimc.save(model, "out/", format="all")     # hf | onnx | pt2 | all, verified, atomic
"""

from .compiler.driver import compress
from .compiler.emit import save
from .compiler.errors import SlimcError
from .compiler.groups import Group, Role, Slice
from .compiler.loaders import load
from .compiler.model import Model
from .compiler.pipeline import Pass, PassContext, PassManager, PassResult, register_pass
from .compiler.surgery import apply_plan, mask_plan

__all__ = [
    "load", "save", "compress", "SlimcError", "Group", "Role", "Slice", "Model", "Pass", "PassContext", "PassManager",
    "PassResult", "register_pass", "apply_plan", "mask_plan",
]
__version__ = "0.1.0"
