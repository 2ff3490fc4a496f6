"""Drop-in nn.Module layers whose parameters, buffers and state_dict keys match PyTorch's."""
from .activation import HardSigmoid, HardSwish

__all__ = ["HardSwish", "HardSigmoid"]
