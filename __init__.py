"""slimc — a compression compiler for neural networks.

    import slimc
    model = slimc.load("path/to/model")                  # HF dir, .gguf, .pt2, .onnx, trusted .pt
    model = slimc.compress(model, "flap-20")             # or a PassManager of passes
    slimc.save(model, "out/")                            # HF checkpoint / ONNX, verified on reload
"""

from .compiler.errors import SlimcError
from .compiler.groups import Group, Role, Slice
from .compiler.model import Model
from .compiler.pipeline import Pass, PassContext, PassManager, PassResult, register_pass
from .compiler.surgery import apply_plan, mask_plan

__all__ = [
    "SlimcError", "Group", "Role", "Slice", "Model", "Pass", "PassContext", "PassManager",
    "PassResult", "register_pass", "apply_plan", "mask_plan",
]
__version__ = "0.1.0"
