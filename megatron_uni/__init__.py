"""megatron-uni: Uni-Perceiver-MoE training on megatron-core."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# Apex and Transformer Engine are optional accelerators: megatron-core warns about their absence
# at import time in four modules, and torch warns that a CPU machine has no CUDA runtime. Both
# are expected here and would bury real warnings, so these (and only these) are silenced before
# anything imports megatron.
_warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)
