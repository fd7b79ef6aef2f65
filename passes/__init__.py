from . import flap
from . import identity
from . import magnitude
from . import nm
from . import group_magnitude
