"""fedota server side: ② aggregate (``server.federation``) and ④ publish (``server.ota``).

Must not import ``client`` or ``simulation``; ``server.ota`` must not import torch.
"""

from server.errors import ServerError, ServerInputError

__all__ = ["ServerError", "ServerInputError"]
