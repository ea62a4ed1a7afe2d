"""The ``fedota`` command line: one entry point whose subcommands live with their packages.

Each top-level package (``simulation``, ``client``, ``server``, ``delta_packager``) owns a
``cli`` module with a ``register(app)`` function; this package only mounts them and turns
domain errors into one clear line and a documented exit code.
"""

__all__: list[str] = []
