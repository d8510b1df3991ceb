"""SQLAlchemy models of the study database.

Patients are pseudonymous: the database holds a study code, sex and birth year,
never a name or a full date of birth. Editable rows carry a ``row_version``
used for optimistic locking (a stale update raises ``StaleDataError``).
Measurements are never edited in place: an override is a new row that
supersedes the old one, so the original value stays for the audit trail.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "AuditEvent",
    "Base",
    "ClinicalAssessment",
    "ImagingSession",
    "MeasurementSource",
    "NewVcfEvent",
    "Patient",
    "Procedure",
    "ProcedureType",
    "Study",
    "TreatedLevel",
    "User",
    "UserRole",
    "VertebraMeasurement",
    "Visit",
    "WindowStatus",
]

# Stable constraint names so Alembic migrations work on SQLite and PostgreSQL alike.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class ProcedureType(enum.StrEnum):
    VERTEBROPLASTY = "vertebroplasty"
    KYPHOPLASTY = "kyphoplasty"
    CONSERVATIVE = "conservative"


class WindowStatus(enum.StrEnum):
    """How a visit date relates to its nominal time point (METHOD.md 1)."""

    BASELINE = "baseline"
    IN_WINDOW = "in_window"
    OUTSIDE_WINDOW = "outside_window"
    UNSCHEDULED = "unscheduled"


class MeasurementSource(enum.StrEnum):
    AUTOMATIC = "automatic"
    MANUAL = "manual"
    IMPORTED = "imported"
    SIMULATED = "simulated"


def _enum(enum_class: type[enum.Enum], name: str) -> Enum:
    # Store values (not member names) as VARCHAR with a CHECK, portable across backends.
    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(300), default="")
    nominal_months: Mapped[list[int]] = mapped_column(JSON, default=lambda: [0, 3, 6, 12])
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow)

    patients: Mapped[list[Patient]] = relationship(
        back_populates="study", cascade="all, delete-orphan"
    )


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (
        UniqueConstraint("study_id", "code", name="uq_patient_study_code"),
        CheckConstraint("sex IN ('F', 'M', 'U')", name="sex"),
        CheckConstraint("birth_year IS NULL OR birth_year BETWEEN 1890 AND 2100", name="birth"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    code: Mapped[str] = mapped_column(String(64))
    sex: Mapped[str] = mapped_column(String(1), default="U")
    birth_year: Mapped[int | None] = mapped_column(Integer)
    enrolled_date: Mapped[dt.date | None] = mapped_column(Date)
    notes: Mapped[str] = mapped_column(Text, default="")
    row_version: Mapped[int] = mapped_column(Integer, default=1)

    study: Mapped[Study] = relationship(back_populates="patients")
    procedures: Mapped[list[Procedure]] = relationship(
        back_populates="patient", cascade="all, delete-orphan"
    )
    visits: Mapped[list[Visit]] = relationship(
        back_populates="patient", cascade="all, delete-orphan"
    )
    new_vcf_events: Mapped[list[NewVcfEvent]] = relationship(
        back_populates="patient", cascade="all, delete-orphan"
    )

    __mapper_args__ = {  # noqa: RUF012
        "version_id_col": row_version
    }


class Procedure(Base):
    __tablename__ = "procedure"
    __table_args__ = (
        UniqueConstraint("patient_id", "procedure_date", name="uq_procedure_patient_date"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(
        ForeignKey("patient.id", ondelete="CASCADE"), index=True
    )
    procedure_date: Mapped[dt.date] = mapped_column(Date)
    procedure_type: Mapped[ProcedureType] = mapped_column(_enum(ProcedureType, "procedure_type"))
    notes: Mapped[str] = mapped_column(Text, default="")
    row_version: Mapped[int] = mapped_column(Integer, default=1)

    patient: Mapped[Patient] = relationship(back_populates="procedures")
    treated_levels: Mapped[list[TreatedLevel]] = relationship(
        back_populates="procedure", cascade="all, delete-orphan"
    )

    __mapper_args__ = {  # noqa: RUF012
        "version_id_col": row_version
    }


class TreatedLevel(Base):
    """One treated VCF: a level of one procedure."""

    __tablename__ = "treated_level"
    __table_args__ = (
        UniqueConstraint("procedure_id", "level", name="uq_treated_level_procedure_level"),
        CheckConstraint("label BETWEEN 1 AND 26", name="label"),
        CheckConstraint("cement_volume_ml IS NULL OR cement_volume_ml >= 0", name="cement"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    procedure_id: Mapped[int] = mapped_column(
        ForeignKey("procedure.id", ondelete="CASCADE"), index=True
    )
    level: Mapped[str] = mapped_column(String(4))
    label: Mapped[int] = mapped_column(Integer)
    cement_volume_ml: Mapped[float | None] = mapped_column(Float)

    procedure: Mapped[Procedure] = relationship(back_populates="treated_levels")


class Visit(Base):
    __tablename__ = "visit"
    __table_args__ = (
        UniqueConstraint("patient_id", "visit_date", name="uq_visit_patient_date"),
        CheckConstraint("nominal_month IS NULL OR nominal_month >= 0", name="month"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(
        ForeignKey("patient.id", ondelete="CASCADE"), index=True
    )
    visit_date: Mapped[dt.date] = mapped_column(Date)
    nominal_month: Mapped[int | None] = mapped_column(Integer)
    days_from_procedure: Mapped[int] = mapped_column(Integer)
    window_status: Mapped[WindowStatus] = mapped_column(_enum(WindowStatus, "window_status"))
    row_version: Mapped[int] = mapped_column(Integer, default=1)

    patient: Mapped[Patient] = relationship(back_populates="visits")
    assessment: Mapped[ClinicalAssessment | None] = relationship(
        back_populates="visit", cascade="all, delete-orphan", uselist=False
    )
    imaging_sessions: Mapped[list[ImagingSession]] = relationship(
        back_populates="visit", cascade="all, delete-orphan"
    )
    measurements: Mapped[list[VertebraMeasurement]] = relationship(
        back_populates="visit", cascade="all, delete-orphan"
    )

    __mapper_args__ = {  # noqa: RUF012
        "version_id_col": row_version
    }


class ClinicalAssessment(Base):
    __tablename__ = "clinical_assessment"
    __table_args__ = (
        CheckConstraint("vas IS NULL OR (vas >= 0 AND vas <= 10)", name="vas"),
        CheckConstraint("vas_unit IN ('0-10', 'mm')", name="vas_unit"),
        CheckConstraint(
            "analgesic_class IS NULL OR analgesic_class BETWEEN 0 AND 3", name="analgesic"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    visit_id: Mapped[int] = mapped_column(
        ForeignKey("visit.id", ondelete="CASCADE"), unique=True, index=True
    )
    # VAS on the 0-10 scale; what was entered (e.g. 73 mm) is kept beside it.
    vas: Mapped[float | None] = mapped_column(Float)
    vas_entered: Mapped[float | None] = mapped_column(Float)
    vas_unit: Mapped[str] = mapped_column(String(8), default="0-10")
    analgesic_class: Mapped[int | None] = mapped_column(Integer)
    analgesic_drugs: Mapped[str] = mapped_column(Text, default="")
    pain_other_level: Mapped[bool | None] = mapped_column(Boolean)
    notes: Mapped[str] = mapped_column(Text, default="")
    row_version: Mapped[int] = mapped_column(Integer, default=1)

    visit: Mapped[Visit] = relationship(back_populates="assessment")

    __mapper_args__ = {  # noqa: RUF012
        "version_id_col": row_version
    }


class NewVcfEvent(Base):
    """A VCF at an untreated level found during follow-up."""

    __tablename__ = "new_vcf_event"
    __table_args__ = (UniqueConstraint("patient_id", "level", name="uq_new_vcf_patient_level"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(
        ForeignKey("patient.id", ondelete="CASCADE"), index=True
    )
    visit_id: Mapped[int | None] = mapped_column(ForeignKey("visit.id", ondelete="SET NULL"))
    level: Mapped[str] = mapped_column(String(4))
    detected_date: Mapped[dt.date] = mapped_column(Date)
    source: Mapped[str] = mapped_column(String(32), default="clinical")

    patient: Mapped[Patient] = relationship(back_populates="new_vcf_events")


class ImagingSession(Base):
    __tablename__ = "imaging_session"
    __table_args__ = (
        UniqueConstraint("study_instance_uid", name="uq_imaging_session_study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    visit_id: Mapped[int] = mapped_column(ForeignKey("visit.id", ondelete="CASCADE"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    stir_series_uid: Mapped[str | None] = mapped_column(String(64))
    t1_series_uid: Mapped[str | None] = mapped_column(String(64))
    acquisition_date: Mapped[dt.date | None] = mapped_column(Date)
    source_path: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow)

    visit: Mapped[Visit] = relationship(back_populates="imaging_sessions")


class VertebraMeasurement(Base):
    """One vertebral body measured at one visit, with its provenance.

    Rows are immutable. An override inserts a new row (source ``manual``,
    ``overridden_by`` and ``override_reason`` set) and points the old row's
    ``superseded_by_id`` at it; the analysis reads rows that are not superseded.
    """

    __tablename__ = "vertebra_measurement"
    __table_args__ = (
        CheckConstraint("bme_percent IS NULL OR bme_percent BETWEEN 0 AND 100", name="bme"),
        CheckConstraint("genant_grade IS NULL OR genant_grade BETWEEN 0 AND 3", name="genant"),
        CheckConstraint(
            "deformity IS NULL OR deformity IN ('none', 'wedge', 'biconcave', 'crush')",
            name="deformity",
        ),
        CheckConstraint("label BETWEEN 1 AND 26", name="label"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    visit_id: Mapped[int] = mapped_column(ForeignKey("visit.id", ondelete="CASCADE"), index=True)
    imaging_session_id: Mapped[int | None] = mapped_column(
        ForeignKey("imaging_session.id", ondelete="SET NULL")
    )
    level: Mapped[str] = mapped_column(String(4))
    label: Mapped[int] = mapped_column(Integer)
    bme_percent: Mapped[float | None] = mapped_column(Float)
    bme_present: Mapped[bool | None] = mapped_column(Boolean)
    body_volume_ml: Mapped[float | None] = mapped_column(Float)
    edema_volume_ml: Mapped[float | None] = mapped_column(Float)
    cement_volume_ml: Mapped[float | None] = mapped_column(Float)
    rim_volume_ml: Mapped[float | None] = mapped_column(Float)
    height_anterior_mm: Mapped[float | None] = mapped_column(Float)
    height_middle_mm: Mapped[float | None] = mapped_column(Float)
    height_posterior_mm: Mapped[float | None] = mapped_column(Float)
    height_loss_percent: Mapped[float | None] = mapped_column(Float)
    genant_grade: Mapped[int | None] = mapped_column(Integer)
    deformity: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[MeasurementSource] = mapped_column(
        _enum(MeasurementSource, "measurement_source")
    )
    method_version: Mapped[str] = mapped_column(String(64), default="")
    settings_json: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    input_series_uids: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow)
    overridden_by: Mapped[str | None] = mapped_column(String(128))
    override_reason: Mapped[str | None] = mapped_column(Text)
    supersedes_id: Mapped[int | None] = mapped_column(
        ForeignKey("vertebra_measurement.id", ondelete="SET NULL")
    )
    superseded_by_id: Mapped[int | None] = mapped_column(
        ForeignKey("vertebra_measurement.id", ondelete="SET NULL"), index=True
    )
    row_version: Mapped[int] = mapped_column(Integer, default=1)

    visit: Mapped[Visit] = relationship(back_populates="measurements")

    __mapper_args__ = {  # noqa: RUF012
        "version_id_col": row_version
    }


class AuditEvent(Base):
    """One changed field: who, when, what, old and new value, and why."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(16))
    entity: Mapped[str] = mapped_column(String(64), index=True)
    entity_id: Mapped[int] = mapped_column(Integer, index=True)
    field: Mapped[str] = mapped_column(String(64), default="")
    old_value: Mapped[str | None] = mapped_column(Text)
    new_value: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text, default="")
    context: Mapped[str] = mapped_column(String(200), default="")


class UserRole(enum.StrEnum):
    """What a web user may do (checked server-side on every route)."""

    ADMIN = "admin"
    RADIOLOGIST = "radiologist"
    DATA_ENTRY = "data_entry"
    VIEWER = "viewer"


class User(Base):
    """A person who logs in to the web app; only a user name, never a patient identifier."""

    __tablename__ = "app_user"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[UserRole] = mapped_column(_enum(UserRole, "user_role"))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow)
    row_version: Mapped[int] = mapped_column(Integer, default=1)

    __mapper_args__ = {  # noqa: RUF012
        "version_id_col": row_version
    }
