"""④ publish: the OTA update service (FastAPI + SQLAlchemy + TUF repository). No torch."""

__all__: list[str] = []
