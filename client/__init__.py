"""fedota client SDK: what runs on the phone.

Stages: ① train (``client.train``) · ⑤ download, ⑥ verify, ⑦ apply (``client.update``) ·
⑧ infer (``client.runtime``). Must not import ``server``, ``simulation``, fastapi or
sqlalchemy (enforced by ``tests/test_import_directions.py``).
"""

from client.errors import ClientError, ClientInputError

__all__ = ["ClientError", "ClientInputError"]
