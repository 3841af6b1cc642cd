"""Data-parallel training over ``torch.distributed``: one engine per GPU, ZeRO-1 style over host memory.

``group`` starts the process groups from torchrun's environment; ``shard`` holds the flat shard math and
the gradient / weight collectives; ``state`` gathers and scatters checkpoints; ``context`` is the one
object the engine talks to. See ``docs/distributed.md``.
"""

from slideformer.dist.context import DistContext
from slideformer.dist.group import Topology, env_topology, init_from_env

__all__ = ["DistContext", "Topology", "env_topology", "init_from_env"]
