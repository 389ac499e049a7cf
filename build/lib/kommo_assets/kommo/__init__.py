"""The Kommo API client and payload parsers, free of Dagster: paging, pacing, retries, parsing."""

from kommo_assets.kommo.client import MAX_PAGE_SIZE, FieldOptions, KommoClient
from kommo_assets.kommo.contacts import ContactBatch
from kommo_assets.kommo.errors import (
    InvalidPayload,
    KommoAuthError,
    KommoError,
    KommoResponseError,
    KommoUnavailableError,
    redact,
)
from kommo_assets.kommo.fanout import SnapshotStream
from kommo_assets.kommo.fields import (
    COLLECT_FIELD_ID,
    DELIVERY_FIELD_ID,
    SOURCE_FIELD_ID,
    VEHICLE_FIELD_ID,
    StagedContact,
    StagedLead,
    clean_text,
    custom_field_values,
    extract_kommo_epoch,
    first_value,
    main_contact_id,
    parse_amount,
    positive_int,
    sanitize_payload,
    select_enum_id,
    staged_contact,
    staged_lead,
)
from kommo_assets.kommo.pacing import DEFAULT_MAX_RPS, Pacer
from kommo_assets.kommo.paging import KeyRange, KeysetPaging, LeadPage
from kommo_assets.kommo.transport import ClientStats

__all__ = [
    "COLLECT_FIELD_ID",
    "DEFAULT_MAX_RPS",
    "DELIVERY_FIELD_ID",
    "MAX_PAGE_SIZE",
    "SOURCE_FIELD_ID",
    "VEHICLE_FIELD_ID",
    "ClientStats",
    "ContactBatch",
    "FieldOptions",
    "InvalidPayload",
    "KeyRange",
    "KeysetPaging",
    "KommoAuthError",
    "KommoClient",
    "KommoError",
    "KommoResponseError",
    "KommoUnavailableError",
    "LeadPage",
    "Pacer",
    "SnapshotStream",
    "StagedContact",
    "StagedLead",
    "clean_text",
    "custom_field_values",
    "extract_kommo_epoch",
    "first_value",
    "main_contact_id",
    "parse_amount",
    "positive_int",
    "redact",
    "sanitize_payload",
    "select_enum_id",
    "staged_contact",
    "staged_lead",
]
