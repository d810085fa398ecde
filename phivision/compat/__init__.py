"""Drop-in names for the model card's code: `from phivision.compat import AutoModelForCausalLM, AutoProcessor`."""

from .processor import AutoProcessor, CompatProcessor, CompatTokenizer

__all__ = ["AutoProcessor", "CompatProcessor", "CompatTokenizer"]

# TODO(lead): compat/model.py needs phivision.weights, which may not exist yet; drop this guard
# (import AutoModelForCausalLM unconditionally) once the model side is in place.
try:
    from .model import AutoModelForCausalLM
except ImportError:  # only while the model package is being written
    pass
else:
    __all__.append("AutoModelForCausalLM")
