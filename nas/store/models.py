"""SQLAlchemy 2 models of the study store, Optuna-style: a handful of tables with classmethod look-ups.

Every table is prefixed ``nas_`` and the alembic version table is ``nas_alembic_version``: the
store shares its database with Optuna's RDB storage, whose tables (``studies``, ``trials``, ...)
and alembic version table (``alembic_version``) it must never touch. JSON columns are canonical
JSON text, so SQLite and PostgreSQL store the same bytes. Times are naive UTC.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

__all__ = [
    "VERSION_TABLE",
    "ArchitectureModel",
    "Base",
    "DeviceModel",
    "EvaluationModel",
    "ExportModel",
    "FrontModel",
    "InflightModel",
    "MetricModel",
    "StudyModel",
    "utcnow",
]

VERSION_TABLE = "nas_alembic_version"

# constraint names carry the (nas_-prefixed) table name: PostgreSQL index names are schema-wide,
# so ours can never collide with Optuna's
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Now, naive UTC (what every DateTime column holds)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base of the store's tables (its metadata holds only ``nas_`` tables)."""

    metadata = MetaData(naming_convention=NAMING)


class StudyModel(Base):
    """A search study: its space, config, budget, accounting, status and driver lease."""

    __tablename__ = "nas_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    space: Mapped[str] = mapped_column(String(64))
    config: Mapped[str] = mapped_column(Text)
    budget: Mapped[str] = mapped_column(Text)
    used_seconds: Mapped[float] = mapped_column(Double, default=0.0)
    trials_done: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="created")
    stage: Mapped[str | None] = mapped_column(String(64))
    stop_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    driver_pid: Mapped[int | None] = mapped_column(Integer)
    driver_host: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    @classmethod
    def find(cls, session: Session, name: str, *, for_update: bool = False) -> StudyModel | None:
        """The study named ``name`` (row-locked on PostgreSQL with ``for_update``), or None."""
        stmt = select(cls).where(cls.name == name)
        if for_update:
            stmt = stmt.with_for_update()
        return session.scalars(stmt).one_or_none()


class ArchitectureModel(Base):
    """An architecture by its hash (sha256 of the spec's canonical JSON); shared by all studies."""

    __tablename__ = "nas_architectures"

    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    space: Mapped[str] = mapped_column(String(64))
    spec: Mapped[str] = mapped_column(Text)
    params: Mapped[int | None] = mapped_column(BigInteger)
    flops: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    @classmethod
    def find(cls, session: Session, spec_hash: str) -> ArchitectureModel | None:
        return session.get(cls, spec_hash)


class DeviceModel(Base):
    """A device an evaluation ran on, keyed by a 16-hex digest of its fingerprint."""

    __tablename__ = "nas_devices"

    key: Mapped[str] = mapped_column(String(16), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(Text)


class EvaluationModel(Base):
    """One piece of work for a study: an architecture at a stage, or study-level work (no arch)."""

    __tablename__ = "nas_evaluations"
    __table_args__ = (
        UniqueConstraint("study_id", "key"),
        Index(None, "study_id", "stage"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("nas_studies.id", ondelete="CASCADE"))
    arch_hash: Mapped[str | None] = mapped_column(ForeignKey("nas_architectures.hash"), index=True)
    stage: Mapped[str] = mapped_column(String(64))
    trial: Mapped[int | None] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    device_key: Mapped[str | None] = mapped_column(ForeignKey("nas_devices.key"), index=True)
    seconds: Mapped[float] = mapped_column(Double)
    error: Mapped[str | None] = mapped_column(Text)
    key: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    @classmethod
    def find_by_key(cls, session: Session, study_id: int, key: str) -> EvaluationModel | None:
        return session.scalars(select(cls).where(cls.study_id == study_id, cls.key == key)).one_or_none()


class MetricModel(Base):
    """One named value of an evaluation (finite floats only)."""

    __tablename__ = "nas_metrics"

    evaluation_id: Mapped[int] = mapped_column(
        ForeignKey("nas_evaluations.id", ondelete="CASCADE"), primary_key=True)
    metric: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float] = mapped_column(Double)


class FrontModel(Base):
    """A study's current Pareto front (replaced as a whole)."""

    __tablename__ = "nas_front"

    study_id: Mapped[int] = mapped_column(ForeignKey("nas_studies.id", ondelete="CASCADE"), primary_key=True)
    arch_hash: Mapped[str] = mapped_column(ForeignKey("nas_architectures.hash"), primary_key=True, index=True)
    rank: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[str] = mapped_column(Text)


class ExportModel(Base):
    """A file an architecture of a study was exported to."""

    __tablename__ = "nas_exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("nas_studies.id", ondelete="CASCADE"), index=True)
    arch_hash: Mapped[str] = mapped_column(ForeignKey("nas_architectures.hash"), index=True)
    path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class InflightModel(Base):
    """A trial a driver has launched and not yet recorded: what a resume after a crash turns into
    an ``interrupted`` evaluation, with the device time it ran (``alive_at`` - ``started_at``)."""

    __tablename__ = "nas_inflight"

    study_id: Mapped[int] = mapped_column(ForeignKey("nas_studies.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    stage: Mapped[str] = mapped_column(String(64))
    arch_hash: Mapped[str | None] = mapped_column(ForeignKey("nas_architectures.hash"))
    trial: Mapped[int | None] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    alive_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
