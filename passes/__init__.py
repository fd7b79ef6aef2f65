from . import identity
from . import magnitude
