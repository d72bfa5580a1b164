"""The SQL store of studies (SQLite file or PostgreSQL), beside Optuna's RDB storage in one database.

A thin re-export, Optuna-style: the machinery is in ``_store.py``, the tables in ``models.py`` and
the schema history in ``migrations/`` (alembic, version table ``nas_alembic_version``).

    from nas.store import Store
    with Store("sqlite:///nas.db") as store:
        store.create_study("s1", "hybrid_vit", config={...}, budget={"seconds": 3600})
"""

from __future__ import annotations

from nas.store._store import (
    HEARTBEAT_S,
    LEASE_STALE_S,
    STATUSES,
    EvaluationRow,
    Store,
    StoreError,
    StoreLost,
    StudyInfo,
    default_url,
    device_key,
    mask_url,
    validate_study_name,
    validate_url,
)

__all__ = [
    "HEARTBEAT_S",
    "LEASE_STALE_S",
    "STATUSES",
    "EvaluationRow",
    "Store",
    "StoreError",
    "StoreLost",
    "StudyInfo",
    "default_url",
    "device_key",
    "mask_url",
    "validate_study_name",
    "validate_url",
]
