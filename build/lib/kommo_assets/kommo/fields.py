"""The one place that parses Kommo payloads: timestamps, custom fields, contacts, amounts and text.

Every parser here is tolerant: Kommo sends the same field in several shapes, and a malformed value
must become ``None`` (reported downstream), never an exception that stops a run. The only exception
is :class:`~kommo_assets.kommo.errors.InvalidPayload`, raised when an entity has no usable id; staging
also skips an entity nested deeper than any Kommo record is (``MAX_NESTING``, see :func:`nesting_exceeds`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation

from kommo_assets.kommo.errors import InvalidPayload

# Lead custom fields this project reads (ids of the production Kommo account).
VEHICLE_FIELD_ID = 1234163  # select: the vehicle booked; enum id -> vehicle
SOURCE_FIELD_ID = 823206  # select: where the lead came from; enum id -> source
DELIVERY_FIELD_ID = 1218176  # date_time: "Date/Time Delivery" -> booking start
COLLECT_FIELD_ID = 1218178  # date_time: "Date/Time Collect" -> booking end

# Timestamps outside these years are data-entry errors or wrong units, not bookings.
MIN_YEAR = 2000
MAX_YEAR = 2100
# A unix-seconds value this large is milliseconds: 1e11 seconds is the year 5138.
_MILLISECONDS_ABOVE = 1e11
# Ids are stored as Postgres bigint and amounts as numeric(14, 2): a larger value cannot be a real Kommo
# id or price, and staging it would fail the whole page's COPY (and with it the run).
MAX_ID = 2**63 - 1
MAX_AMOUNT = Decimal("999999999999.99")
_AMOUNT_OVERFLOW = MAX_AMOUNT + Decimal("0.005")  # Postgres rounds half away from zero, to cents
# MAX_ID has 19 digits. A longer digit string is no id, and is refused before int() sees it: Python refuses
# to convert more than 4,300 digits (ValueError), which would stop the run instead of skipping one value.
_MAX_ID_DIGITS = len(str(MAX_ID))
# Kommo's records nest about seven levels (lead -> custom_fields_values -> field -> values -> value). One
# nested deeper is skipped as a whole: storing it walks it recursively (json.dumps, the sanitizer), and
# near Python's recursion limit that walk would fail the run, not just the record.
MAX_NESTING = 64

_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_INT_TEXT_RE = re.compile(r"([+-]?)(\d+)(?:\.0*)?")
# C0 control characters except \t and \n, plus lone UTF-16 surrogates (they cannot be encoded as
# UTF-8, so Postgres would reject the row).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\ud800-\udfff]")
_INVALID_IN_JSONB_RE = re.compile(r"[\x00\ud800-\udfff]")

PHONE_CODE = "PHONE"
EMAIL_CODE = "EMAIL"
# Field names Kommo gives the system PHONE/EMAIL fields in its interface languages; used only when
# a multitext field arrives without its field_code.
_FALLBACK_NAMES = {
    PHONE_CODE: frozenset({"phone", "телефон", "teléfono", "telefone", "telefon", "téléphone"}),
    EMAIL_CODE: frozenset({"email", "e-mail", "почта", "correo", "correo electrónico"}),
}


# --- small coercions ---------------------------------------------------------------------------


def _as_int(value: object) -> int | None:
    """An int from an int, an integral float or a decimal-digit string (``"42"``, ``"42.0"``) of at most
    19 significant digits; bools, longer digit strings and anything else -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        match = _INT_TEXT_RE.fullmatch(value.strip())
        if match is None:
            return None
        sign, digits = match.groups()
        digits = digits.lstrip("0") or "0"
        return int(sign + digits) if len(digits) <= _MAX_ID_DIGITS else None
    return None


def positive_int(value: object) -> int | None:
    """A Kommo id: a positive int (at most ``MAX_ID``, the bigint range) from an int, an integral float or
    a digit string; else None."""
    number = _as_int(value)
    return number if number is not None and 0 < number <= MAX_ID else None


def nesting_exceeds(value: object, limit: int = MAX_NESTING) -> bool:
    """Whether a decoded JSON value nests objects and arrays more than ``limit`` levels deep (a scalar is
    level 0, ``{}`` and ``[]`` level 1). Iterative: a value of any depth is measured without recursion."""
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if level > limit:
            return True
        pending.extend((child, level + 1) for child in children if isinstance(child, dict | list | tuple))
    return False


# --- timestamps ----------------------------------------------------------------------------------


def _from_number(number: float) -> datetime | None:
    if not math.isfinite(number) or number <= 0:
        return None
    if abs(number) > _MILLISECONDS_ABOVE:
        number = number / 1000.0
    return datetime.fromtimestamp(number, tz=UTC)


def _from_text(text: str) -> datetime | None:
    if _NUMBER_RE.fullmatch(text):
        return _from_number(float(text))
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _epoch(value: object, depth: int) -> datetime | None:
    if value is None or isinstance(value, bool) or depth > 3:
        return None
    if isinstance(value, dict):
        return _epoch(value.get("value"), depth + 1)
    if isinstance(value, list | tuple):
        return _epoch(value[0], depth + 1) if value else None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(0, 0), tzinfo=UTC)
    if isinstance(value, int | float | Decimal):
        return _from_number(float(value))
    if isinstance(value, str):
        text = value.strip()
        return _from_text(text) if text else None
    return None


def extract_kommo_epoch(value: object) -> datetime | None:
    """A timezone-aware UTC datetime from any timestamp shape Kommo sends, or None.

    Accepted shapes and fallbacks:

    - int/float unix seconds (``1734012000``), and the same as a numeric string (``"1734012000"``,
      ``"1734012000.0"``); Kommo's ``date_time`` fields and lead timestamps are int seconds.
    - milliseconds: any number above 1e11 is divided by 1000.
    - ISO 8601 text (``"2025-03-01T10:00:00+03:00"``, ``"...Z"``, ``"2025-03-01 10:00:00"``); a
      naive time is taken as UTC; a bare date (``"2025-03-01"``) is midnight UTC. This is what
      the official PHP library writes (RFC 3339), so a value written through it reads back.
    - a ``{"value": ...}`` dict (a custom-field value item) or a list (its first element), and
      ``datetime``/``date`` objects.

    None for: None, "", 0, negatives, bools (they are not numbers), NaN/inf, unparseable text, and
    anything outside the years 2000..2100 (a wrong unit or a typo, not a real booking). Never raises.
    """
    try:
        result = _epoch(value, 0)
    except (ValueError, OverflowError, OSError, TypeError, ArithmeticError):
        return None
    if result is None or not MIN_YEAR <= result.year <= MAX_YEAR:
        return None
    return result


# --- custom fields -------------------------------------------------------------------------------


def custom_field_values(entity: dict, field_id: int) -> list[dict]:
    """The ``values`` items of custom field ``field_id`` on a lead or contact; [] when absent.

    Tolerates: ``entity`` not a dict, ``custom_fields_values`` null (Kommo sends null, not [], when no
    field is set), missing or not a list; items that are not dicts; ``field_id`` sent as a string;
    ``values`` missing or not a list; value items that are not dicts (dropped). When the same field
    appears twice, the first occurrence that has values wins.
    """
    if not isinstance(entity, dict):
        return []
    fields = entity.get("custom_fields_values")
    if not isinstance(fields, list):
        return []
    for item in fields:
        if not isinstance(item, dict) or _as_int(item.get("field_id")) != field_id:
            continue
        values = item.get("values")
        if not isinstance(values, list):
            continue
        kept = [value for value in values if isinstance(value, dict)]
        if kept:
            return kept
    return []


def select_enum_id(entity: dict, field_id: int) -> int | None:
    """The ``enum_id`` of the first value of a select field (int, or a numeric string); None if missing,
    not a positive integer, or the field is absent. The label (``value``) is ignored: ids are stable,
    labels get renamed."""
    values = custom_field_values(entity, field_id)
    if not values:
        return None
    return positive_int(values[0].get("enum_id"))


def first_value(entity: dict, field_id: int) -> object | None:
    """The raw ``value`` of the first value item of a custom field; None when absent."""
    values = custom_field_values(entity, field_id)
    if not values:
        return None
    return values[0].get("value")


def main_contact_id(lead: dict) -> int | None:
    """The lead's main contact from ``_embedded.contacts`` (needs ``with=contacts``).

    The contact with ``is_main: true`` wins; without one, the first contact; contacts without a usable
    positive id are skipped; None when the lead has no (readable) contacts.
    """
    if not isinstance(lead, dict):
        return None
    embedded = lead.get("_embedded")
    contacts = embedded.get("contacts") if isinstance(embedded, dict) else None
    if not isinstance(contacts, list):
        return None
    usable = [
        (contact_id, contact.get("is_main") is True)
        for contact in contacts
        if isinstance(contact, dict) and (contact_id := positive_int(contact.get("id"))) is not None
    ]
    for contact_id, is_main in usable:
        if is_main:
            return contact_id
    return usable[0][0] if usable else None


# --- text and amounts ----------------------------------------------------------------------------


def clean_text(value: object, max_len: int = 1000) -> str | None:
    """Text safe to store: ``str(value)`` (bytes decoded as UTF-8), without NUL and other C0 control
    characters (tab and newline are kept) or lone surrogates, stripped, cut to ``max_len`` characters.
    None for None and for text that ends up empty. Everything else (quotes, SQL-looking text, emoji)
    passes through unchanged: the database layer binds parameters, it does not escape."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", errors="replace")
    else:
        text = value if isinstance(value, str) else str(value)
    text = _CONTROL_RE.sub("", text).strip()
    if len(text) > max_len:
        text = text[:max_len].rstrip()
    return text or None


def parse_amount(value: object) -> Decimal | None:
    """A non-negative Decimal from an int, a float or a numeric string, or None.

    Strings may use a comma or a dot as the decimal separator and spaces as thousands separators
    (``"1 234,50"``); when both ``,`` and ``.`` appear, the rightmost one is the decimal separator and
    the other is a thousands separator (``"1,234.50"``, ``"1.234,50"``). None for: None, bools,
    negatives, NaN/inf, anything unparseable, and amounts that round to more than ``MAX_AMOUNT`` (what
    the ``numeric(14, 2)`` columns hold).
    """
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, int):
            amount = Decimal(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                return None
            amount = Decimal(repr(value))
        elif isinstance(value, Decimal):
            amount = value
        elif isinstance(value, str):
            text = re.sub(r"[\s\u00a0\u202f]", "", value)
            if "," in text and "." in text:
                decimal_sep = "," if text.rfind(",") > text.rfind(".") else "."
                thousands_sep = "." if decimal_sep == "," else ","
                text = text.replace(thousands_sep, "").replace(decimal_sep, ".")
            else:
                text = text.replace(",", ".")
            if not re.fullmatch(r"\+?(?:\d+(?:\.\d*)?|\.\d+)", text):
                return None
            amount = Decimal(text)
        else:
            return None
    except (InvalidOperation, ValueError):
        return None
    if not amount.is_finite() or amount < 0:
        return None
    if amount >= _AMOUNT_OVERFLOW:
        return None
    return amount


# --- staged rows ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StagedLead:
    """The columns of a staged lead, parsed from one raw Kommo lead."""

    lead_id: int
    contact_id: int | None
    status_id: int | None
    pipeline_id: int | None
    responsible_user_id: int | None
    price: Decimal | None
    name: str | None
    vehicle_enum_id: int | None
    source_enum_id: int | None
    delivery_at: datetime | None
    collect_at: datetime | None
    created_at: datetime | None
    updated_at: datetime | None
    closed_at: datetime | None


def staged_lead(lead: dict) -> StagedLead:
    """Parses a raw lead (as returned by ``/api/v4/leads``) into a :class:`StagedLead`.

    Raises :class:`InvalidPayload` only when ``lead`` is not a dict or has no positive integer ``id`` (an
    int or a numeric string of at most 19 digits). Every other field falls back to None when missing or
    malformed: ids (status, pipeline, responsible user, enums) must be positive integers up to ``MAX_ID``;
    ``price`` goes through :func:`parse_amount`; ``name`` through :func:`clean_text`; vehicle and source
    are the first ``enum_id`` of fields 1234163 and 823206; delivery and collect the first value of fields
    1218176 and 1218178 through :func:`extract_kommo_epoch`, as are created/updated/closed_at; the contact
    is :func:`main_contact_id`.
    """
    if not isinstance(lead, dict):
        raise InvalidPayload(f"lead is not an object but {type(lead).__name__}")
    lead_id = positive_int(lead.get("id"))
    if lead_id is None:
        raise InvalidPayload(f"lead has no usable id (id={_short(lead.get('id'))})")
    return StagedLead(
        lead_id=lead_id,
        contact_id=main_contact_id(lead),
        status_id=positive_int(lead.get("status_id")),
        pipeline_id=positive_int(lead.get("pipeline_id")),
        responsible_user_id=positive_int(lead.get("responsible_user_id")),
        price=parse_amount(lead.get("price")),
        name=clean_text(lead.get("name")),
        vehicle_enum_id=select_enum_id(lead, VEHICLE_FIELD_ID),
        source_enum_id=select_enum_id(lead, SOURCE_FIELD_ID),
        delivery_at=extract_kommo_epoch(first_value(lead, DELIVERY_FIELD_ID)),
        collect_at=extract_kommo_epoch(first_value(lead, COLLECT_FIELD_ID)),
        created_at=extract_kommo_epoch(lead.get("created_at")),
        updated_at=extract_kommo_epoch(lead.get("updated_at")),
        closed_at=extract_kommo_epoch(lead.get("closed_at")),
    )


@dataclass(frozen=True, slots=True)
class StagedContact:
    """The columns of a staged contact, parsed from one raw Kommo contact."""

    contact_id: int
    name: str | None
    phone: str | None
    email: str | None


def _multitext_first(contact: dict, code: str) -> str | None:
    fields = contact.get("custom_fields_values")
    if not isinstance(fields, list):
        return None
    items = [item for item in fields if isinstance(item, dict)]
    by_code = [item for item in items if str(item.get("field_code") or "").strip().upper() == code]
    by_name = [
        item
        for item in items
        if not item.get("field_code")
        and item.get("field_type") == "multitext"
        and str(item.get("field_name") or "").strip().lower() in _FALLBACK_NAMES[code]
    ]
    for item in by_code + by_name:
        values = item.get("values")
        if not isinstance(values, list):
            continue
        for value in values:
            if isinstance(value, dict):
                text = clean_text(value.get("value"), max_len=255)
                if text:
                    return text
    return None


def staged_contact(contact: dict) -> StagedContact:
    """Parses a raw contact (as returned by ``/api/v4/contacts``) into a :class:`StagedContact`.

    Raises :class:`InvalidPayload` only when ``contact`` is not a dict or has no positive integer id (an
    int or a numeric string of at most 19 digits).
    Fallbacks: ``name`` is the cleaned ``name``, else ``first_name`` + ``last_name`` joined by a space,
    else None. ``phone``/``email`` are the first non-empty value of the multitext field whose
    ``field_code`` is PHONE/EMAIL (any case); when no field carries the code, a ``multitext`` field
    without a code whose name is the system field's name in a Kommo interface language ("Phone",
    "Телефон", "Email", ...) is used instead. Values are cleaned with :func:`clean_text` (max 255).
    """
    if not isinstance(contact, dict):
        raise InvalidPayload(f"contact is not an object but {type(contact).__name__}")
    contact_id = positive_int(contact.get("id"))
    if contact_id is None:
        raise InvalidPayload(f"contact has no usable id (id={_short(contact.get('id'))})")
    name = clean_text(contact.get("name"))
    if name is None:
        parts = [clean_text(contact.get("first_name")), clean_text(contact.get("last_name"))]
        name = clean_text(" ".join(part for part in parts if part))
    return StagedContact(
        contact_id=contact_id,
        name=name,
        phone=_multitext_first(contact, PHONE_CODE),
        email=_multitext_first(contact, EMAIL_CODE),
    )


def sanitize_payload(obj: object) -> object:
    """A deep copy of a decoded JSON payload that Postgres ``jsonb`` accepts, for storing raw payloads.

    Removes NUL characters (jsonb rejects ``\\u0000``) and lone surrogates (invalid Unicode) from every
    string, dict keys included; turns NaN/inf floats into None (not valid JSON); tuples become lists.
    Everything else is copied as is. Recursive: check :func:`nesting_exceeds` first on untrusted input.
    """
    if isinstance(obj, str):
        return _INVALID_IN_JSONB_RE.sub("", obj)
    if isinstance(obj, dict):
        return {
            (sanitize_payload(key) if isinstance(key, str) else key): sanitize_payload(value)
            for key, value in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [sanitize_payload(item) for item in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _short(value: object, limit: int = 40) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4,300 digits has no repr
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
