"""The model registry: register fused-model versions, promote through a metric gate, roll back.

See :mod:`detailfusion.registry.operations` for the alias protocol (``@challenger`` ->
``@champion`` -> ``@previous-champion``), :mod:`detailfusion.registry.registration` for new
versions, :mod:`detailfusion.registry.versions` for reading them, and
:mod:`detailfusion.registry.lock` for the server-side mutex that keeps concurrent promotions
consistent.
"""

from detailfusion.registry.config import RegistryConfig
from detailfusion.registry.lock import PromotionLock, RegistryError
from detailfusion.registry.operations import Decision, Rollback, promote, rollback
from detailfusion.registry.registration import metrics_from_files, register
from detailfusion.registry.versions import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    ALIAS_PREVIOUS,
    format_versions,
    list_versions,
    registry_client,
)

__all__ = [
    "ALIAS_CHALLENGER",
    "ALIAS_CHAMPION",
    "ALIAS_PREVIOUS",
    "Decision",
    "PromotionLock",
    "RegistryConfig",
    "RegistryError",
    "Rollback",
    "format_versions",
    "list_versions",
    "metrics_from_files",
    "promote",
    "register",
    "registry_client",
    "rollback",
]
