"""fedota server side: ② aggregate (``server.federation``) and ④ publish (``server.ota``).

Must not import ``client`` or ``simulation``; ``server.ota`` must not import torch.
``ServerInputError`` is what code outside this package imports from here.
"""

from server.errors import ServerInputError

__all__ = ["ServerInputError"]
