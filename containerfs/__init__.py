"""containerfs: the service that plays the kernel's part of the container system calls, and
`Container`, the object programs use (docs/api.md, "The Python API")."""

from .api import Container
from .spawn import ContainerPopen

__all__ = ["Container", "ContainerPopen"]
