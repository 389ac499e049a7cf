"""The bad-input corpus: malformed Kommo payloads through the real path (simulator over HTTP -> client ->
staging -> drop guard -> swap on real Postgres), each with its own defined outcome.

One simulator holds 240 ordinary leads of 2025 plus one crafted lead (and, where it matters, one crafted
contact) per case, served verbatim; one full refresh runs for the whole module. Each case is then its own
test: the lead is either imported with the documented fallback, or skipped and counted in the
``skipped`` metadata of ``stg_kommo_leads``; never a crashed swap. The outcomes are listed in
docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets.kommo.fields import MAX_AMOUNT, MAX_ID, MAX_NESTING, parse_amount, positive_int
from kommo_assets_tests.faults.support import (
    materializations,
    run,
    set_code_location_env,
    step_failure,
)
from kommo_assets_tests.helpers import create_database, database_name, drop_database
from kommo_assets_tests.test_full_refresh import STATUS_MAP, WINDOW, expected_snapshot

VEHICLE, SOURCE, DELIVERY, COLLECT = 1234163, 823206, 1218176, 1218178
CONFIRMED, BOT_ANSWERING, LOST = 79790637, 79790631, 143
KNOWN_VEHICLE, KNOWN_SOURCE = 1000003, 2000001  # options of the simulated account ("Instagram")
OWNER_USER = 5550001
T = 1740830400  # 2025-03-01T12:00:00Z
T_AT = datetime(2025, 3, 1, 12, tzinfo=UTC)
T_COLLECT = T + 3 * 86400
T_COLLECT_AT = datetime(2025, 3, 4, 12, tzinfo=UTC)
CREATED = WINDOW[0] + 30 * 86400  # 2025-01-31
LATE = WINDOW[0] + 320 * 86400  # 2025-11-17
LEAD_BASE, CONTACT_BASE = 29_000_000, 39_000_000
MISSING_CONTACT = 39_999_999
SHARED_CONTACT = 39_000_900  # a well-formed contact several cases point at
BIGINT_MAX = 2**63 - 1
DELETE = object()  # an override that removes the key
# Python's int() refuses more than 4,300 digits (ValueError): such an id once stopped every run.
LONG_DIGITS = "9" * 5000
# Options the corpus adds to the account's select fields (served by the simulator as crafted field
# definitions): labels with control characters, a label of nothing but them, an id of 5,000 digits.
NUL_LABEL_VEHICLE, BLANK_LABEL_VEHICLE, NUL_LABEL_SOURCE = 1999001, 1999002, 2999001
EXTRA_OPTIONS = {
    VEHICLE: [{"id": NUL_LABEL_VEHICLE, "value": "Fiat\x00 500\x07 \u00b7 AB123CD\x1b", "sort": 9000},
              {"id": BLANK_LABEL_VEHICLE, "value": "\x00\x1b \x07", "sort": 9010},
              {"id": LONG_DIGITS, "value": "an option whose id has 5,000 digits", "sort": 9020}],
    SOURCE: [{"id": NUL_LABEL_SOURCE, "value": "Web\x00site\x1f", "sort": 9000},
             {"id": LONG_DIGITS, "value": "an option whose id has 5,000 digits", "sort": 9010}],
}

# --- how a corpus lead is built ------------------------------------------------------------------


def lead_id(n: int) -> int:
    return LEAD_BASE + n


def contact_id(n: int) -> int:
    return CONTACT_BASE + n


def _select(field_id: int, enum_id: Any) -> dict:
    return {"field_id": field_id, "field_name": "Select", "field_code": None, "field_type": "select",
            "values": [{"value": "label", "enum_id": enum_id, "enum_code": None}]}


def _date(field_id: int, value: Any) -> dict:
    return {"field_id": field_id, "field_name": "Date", "field_code": None, "field_type": "date_time",
            "values": [{"value": value}]}


def good_contact(n: int, **overrides: Any) -> dict:
    contact = {
        "id": contact_id(n), "name": f"Client {n}", "first_name": "Client", "last_name": str(n),
        "responsible_user_id": OWNER_USER, "created_at": CREATED, "updated_at": CREATED, "is_deleted": False,
        "custom_fields_values": [
            {"field_id": 514001, "field_name": "Phone", "field_code": "PHONE", "field_type": "multitext",
             "values": [{"value": f"+49 151 {n:07d}", "enum_id": 715005, "enum_code": "MOB"}]},
            {"field_id": 514003, "field_name": "Email", "field_code": "EMAIL", "field_type": "multitext",
             "values": [{"value": f"client{n}@example.com", "enum_id": 715011, "enum_code": "WORK"}]},
        ],
        "account_id": 31415926, "_embedded": {"tags": [], "companies": []},
    }
    return _apply(contact, overrides)


def good_lead(n: int, fields: dict | None = None, **overrides: Any) -> dict:
    """An ordinary confirmed booking lead; ``fields`` replaces (value) or drops (DELETE) custom fields by id,
    ``overrides`` top-level keys."""
    cfv = {VEHICLE: _select(VEHICLE, KNOWN_VEHICLE), SOURCE: _select(SOURCE, KNOWN_SOURCE),
           DELIVERY: _date(DELIVERY, T), COLLECT: _date(COLLECT, T_COLLECT)}
    for field_id, item in (fields or {}).items():
        cfv[field_id] = item
    lead = {
        "id": lead_id(n), "name": f"Corpus lead {n}", "price": 1000, "responsible_user_id": OWNER_USER,
        "group_id": 0, "status_id": CONFIRMED, "pipeline_id": 8841234, "loss_reason_id": None,
        "created_by": 0, "updated_by": 0, "created_at": CREATED, "updated_at": CREATED, "closed_at": None,
        "closest_task_at": None, "is_deleted": False,
        "custom_fields_values": [item for item in cfv.values() if item is not DELETE],
        "score": None, "account_id": 31415926, "labor_cost": None,
        "_embedded": {"tags": [], "companies": [], "contacts": [{"id": contact_id(n), "is_main": True}]},
    }
    return _apply(lead, overrides)


def _apply(payload: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if value is DELETE:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


def dates(delivery: Any = DELETE, collect: Any = DELETE) -> dict:
    return {DELIVERY: DELETE if delivery is DELETE else _date(DELIVERY, delivery),
            COLLECT: DELETE if collect is DELETE else _date(COLLECT, collect)}


def vehicle_values(values: Any) -> dict:
    return {VEHICLE: {"field_id": VEHICLE, "field_name": "Vehicle", "field_code": None, "field_type": "select",
                      "values": values}}


def nested(levels: int) -> Any:
    """A JSON value ``levels`` objects and arrays deep."""
    value: Any = "leaf"
    for level in range(levels):
        value = {"k": value} if level % 2 else [value]
    return value


def deep_field(levels: int) -> dict:
    """A custom field this project does not read, whose value nests ``levels`` deep (the record nests
    ``levels + 4``: record, field list, field, values, value)."""
    return {999001: {"field_id": 999001, "field_name": "Notes", "field_code": None, "field_type": "text",
                     "values": [nested(levels)]}}


# --- the cases ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One bad input. ``payload`` is what Kommo lists; ``contact`` the main contact Kommo returns (None:
    none); ``expect`` the production values of an imported lead (by ``Result`` column name), or
    ``skipped`` the reason it is left out and counted under."""

    name: str
    group: str
    outcome: str
    n: int
    payload: Any
    contact: dict | None = None
    expect: dict = dataclasses.field(default_factory=dict)
    skipped: str | None = None
    undated: bool = False
    code: str | None = None  # the lead code it is imported under (default kommo:<LEAD_BASE + n>)

    @property
    def lead_code(self) -> str:
        return self.code or f"kommo:{lead_id(self.n)}"


CASES: list[Case] = []
_n = iter(range(1, 1000))


def case(name: str, group: str, outcome: str, *, payload: Any = None, fields: dict | None = None,
         contact: Any = "good", lead: dict | None = None, **kwargs: Any) -> Case:
    n = next(_n)
    if payload is None:
        payload = good_lead(n, fields, **(lead or {}))
    if contact == "good":
        contact = good_contact(n)
    elif callable(contact):
        contact = contact(n)
    result = Case(name, group, outcome, n, payload, contact, **kwargs)
    CASES.append(result)
    return result


UNDATED = {"start_at": None, "end_at": None}

# custom fields
case("cf_null", "custom fields", "custom_fields_values null -> imported; no vehicle, source or dates (undated)",
     lead={"custom_fields_values": None}, expect={"vehicle": None, "source": None, **UNDATED}, undated=True)
case("cf_object_instead_of_list", "custom fields", "custom_fields_values an object -> read as no fields",
     lead={"custom_fields_values": {"1234163": KNOWN_VEHICLE}}, expect={"vehicle": None, **UNDATED}, undated=True)
case("cf_items_not_objects", "custom fields", "field items that are not objects are ignored",
     lead={"custom_fields_values": ["vehicle", 5, None]}, expect={"vehicle": None, **UNDATED}, undated=True)
case("cf_values_missing", "custom fields", "a field without `values` -> that field is absent (no vehicle)",
     fields={VEHICLE: {"field_id": VEHICLE, "field_type": "select"}}, expect={"vehicle": None, "start_at": T_AT})
case("cf_values_not_list", "custom fields", "`values` a string -> field absent",
     fields=vehicle_values(str(KNOWN_VEHICLE)), expect={"vehicle": None})
case("cf_value_items_not_objects", "custom fields", "value items that are not objects are dropped",
     fields=vehicle_values([KNOWN_VEHICLE]), expect={"vehicle": None})
case("cf_field_id_as_string", "custom fields", "field_id sent as a string is matched",
     fields={VEHICLE: {**_select(VEHICLE, KNOWN_VEHICLE), "field_id": str(VEHICLE)}},
     expect={"vehicle": KNOWN_VEHICLE})
case("cf_enum_id_as_string", "custom fields", "enum_id sent as a numeric string is read",
     fields={VEHICLE: _select(VEHICLE, str(KNOWN_VEHICLE))}, expect={"vehicle": KNOWN_VEHICLE})
case("cf_enum_label_only", "custom fields", "a select value with a label but no enum_id -> no vehicle "
     "(labels are renamed, ids are trusted)", fields=vehicle_values([{"value": "Fiat 500"}]), expect={"vehicle": None})
case("cf_enum_id_negative", "custom fields", "enum_id not a positive integer -> no vehicle",
     fields={VEHICLE: _select(VEHICLE, -5)}, expect={"vehicle": None})
case("cf_field_twice_first_empty", "custom fields", "the same field twice: the first with values wins",
     lead={"custom_fields_values": [vehicle_values([])[VEHICLE], _select(VEHICLE, 1000004), _date(DELIVERY, T)]},
     expect={"vehicle": 1000004})
case("cf_enum_id_beyond_bigint", "custom fields", "enum_id beyond bigint -> no vehicle",
     fields={VEHICLE: _select(VEHICLE, 2**70)}, expect={"vehicle": None})

# timestamps of the booking (fields 1218176 delivery / 1218178 collect)
case("epoch_int", "timestamps", "unix seconds (int) -> that instant", expect={"start_at": T_AT, "end_at": T_COLLECT_AT})
case("epoch_numeric_string", "timestamps", "unix seconds as a string -> that instant",
     fields=dates(str(T), str(T_COLLECT)), expect={"start_at": T_AT, "end_at": T_COLLECT_AT})
case("epoch_float_string", "timestamps", "\"1740830400.0\" -> that instant",
     fields=dates(f"{T}.0", T_COLLECT), expect={"start_at": T_AT})
case("epoch_milliseconds", "timestamps", "milliseconds (above 1e11) -> that instant",
     fields=dates(T * 1000, T_COLLECT * 1000), expect={"start_at": T_AT, "end_at": T_COLLECT_AT})
case("epoch_milliseconds_string", "timestamps", "milliseconds as a string -> that instant",
     fields=dates(str(T * 1000), T_COLLECT), expect={"start_at": T_AT})
case("epoch_iso_utc", "timestamps", "ISO 8601 with Z -> that instant",
     fields=dates("2025-03-01T12:00:00Z", "2025-03-04T12:00:00Z"), expect={"start_at": T_AT, "end_at": T_COLLECT_AT})
case("epoch_iso_offset", "timestamps", "ISO 8601 with an offset -> converted to UTC",
     fields=dates("2025-03-01T15:00:00+03:00", T_COLLECT), expect={"start_at": T_AT})
case("epoch_iso_naive", "timestamps", "ISO without offset -> taken as UTC",
     fields=dates("2025-03-01 12:00:00", T_COLLECT), expect={"start_at": T_AT})
case("epoch_date_only", "timestamps", "a bare date -> midnight UTC",
     fields=dates("2025-03-01", T_COLLECT), expect={"start_at": datetime(2025, 3, 1, tzinfo=UTC)})
case("epoch_zero", "timestamps", "0 -> no date; both 0 -> undated booking (warning all_bookings_dated)",
     fields=dates(0, 0), expect=UNDATED, undated=True)
case("epoch_negative", "timestamps", "negative -> no date (undated)", fields=dates(-86400, -1), expect=UNDATED,
     undated=True)
case("epoch_absurd_future_year", "timestamps", "year 3000 -> no date (outside 2000..2100; undated)",
     fields=dates(32503680000, "3000-01-01T00:00:00Z"), expect=UNDATED, undated=True)
case("epoch_absurd_past_year", "timestamps", "year 1899 -> no date (undated)",
     fields=dates("1899-12-31", 86400), expect=UNDATED, undated=True)
case("epoch_unparseable_text", "timestamps", "text that is no date -> no date (undated)",
     fields=dates("soon", "next tuesday"), expect=UNDATED, undated=True)
case("epoch_bool", "timestamps", "true/false -> no date (undated)", fields=dates(True, False), expect=UNDATED,
     undated=True)
case("epoch_huge_number", "timestamps", "1e20 -> no date (undated)", fields=dates(10**20, 1e300),
     expect=UNDATED, undated=True)
case("only_collect", "timestamps", "only the collect date -> start and end both take it",
     fields=dates(DELETE, T_COLLECT), expect={"start_at": T_COLLECT_AT, "end_at": T_COLLECT_AT})
case("delivery_valid_collect_garbage", "timestamps", "collect unreadable -> end takes the delivery date",
     fields=dates(T, "garbage"), expect={"start_at": T_AT, "end_at": T_AT})
case("collect_before_delivery", "timestamps", "collect before delivery -> imported as sent (not reordered)",
     fields=dates(T_COLLECT, T), expect={"start_at": T_COLLECT_AT, "end_at": T_AT})

# the lead's own timestamps and ids
case("created_at_iso", "lead ids and timestamps", "created_at as ISO text -> read, window checked, imported",
     lead={"created_at": "2025-01-31T00:00:00Z"}, expect={"kommo_created_at": datetime(2025, 1, 31, tzinfo=UTC)})
case("created_at_milliseconds", "lead ids and timestamps", "created_at in milliseconds -> imported",
     lead={"created_at": CREATED * 1000}, expect={"kommo_created_at": datetime(2025, 1, 31, tzinfo=UTC)})
case("created_at_missing", "lead ids and timestamps", "no created_at -> skipped (`invalid`)",
     lead={"created_at": DELETE}, skipped="invalid")
case("created_at_absurd", "lead ids and timestamps", "created_at in 1970 -> unreadable, skipped (`invalid`)",
     lead={"created_at": 1}, skipped="invalid")
case("created_at_outside_window", "lead ids and timestamps",
     "created_at outside the window (the server ignored the filter) -> skipped (`outside_window`)",
     lead={"created_at": WINDOW[1] + 86400}, skipped="outside_window")
case("id_missing", "lead ids and timestamps", "no id -> skipped (`invalid`)", lead={"id": DELETE}, skipped="invalid")
case("id_zero", "lead ids and timestamps", "id 0 -> skipped (`invalid`)", lead={"id": 0}, skipped="invalid")
case("id_negative", "lead ids and timestamps", "negative id -> skipped (`invalid`)", lead={"id": -7},
     skipped="invalid")
case("id_beyond_bigint", "lead ids and timestamps", "id beyond bigint -> skipped (`invalid`)",
     lead={"id": 2**64}, skipped="invalid")
_id_string = case("id_as_string", "lead ids and timestamps", "id as a numeric string -> imported under that id",
                  expect={"name": "Corpus lead"})
_id_string.payload["id"] = str(lead_id(_id_string.n))
_id_string.payload["name"] = "Corpus lead"
_id_float = case("id_as_float", "lead ids and timestamps", "id as an integral float -> imported",
                 expect={"name": "Corpus lead"})
_id_float.payload["id"] = float(lead_id(_id_float.n))
_id_float.payload["name"] = "Corpus lead"
case("not_an_object", "lead ids and timestamps", "a list entry that is not an object -> skipped (`invalid`)",
     payload="this is not a lead", contact=None, skipped="invalid")
case("is_deleted", "lead ids and timestamps", "is_deleted true -> skipped (`deleted`)",
     lead={"is_deleted": True}, skipped="deleted")

# statuses, enums and users unknown to the maps
case("status_lost", "statuses, enums, users", "status 143 -> skipped (`excluded_status`)",
     lead={"status_id": LOST}, skipped="excluded_status")
case("status_unknown", "statuses, enums, users", "status unknown to kommo_status_map -> booking `pending` "
     "(warning all_statuses_mapped)", lead={"status_id": 12345678},
     expect={"status": "pending", "kommo_status_id": 12345678})
case("status_missing", "statuses, enums, users", "no status -> booking `pending` without a status id "
     "(warning all_statuses_mapped)", lead={"status_id": None}, expect={"status": "pending", "kommo_status_id": None})
case("status_as_string", "statuses, enums, users", "status id as a string -> mapped",
     lead={"status_id": str(CONFIRMED)}, expect={"status": "confirmed", "kommo_status_id": CONFIRMED})
case("status_no_booking", "statuses, enums, users", "status 79790631 -> sales lead only, no booking",
     lead={"status_id": BOT_ANSWERING}, expect={"stage_id": BOT_ANSWERING, "booking": False})
case("status_beyond_bigint", "statuses, enums, users", "status id beyond bigint -> no status: booking "
     "`pending`", lead={"status_id": 2**63}, expect={"status": "pending", "kommo_status_id": None})
case("vehicle_enum_unknown", "statuses, enums, users", "vehicle enum not among the field's options -> "
     "vehicle created as `Kommo vehicle #<id>` (warning no_vehicles_to_create)",
     fields={VEHICLE: _select(VEHICLE, 1999999)}, expect={"vehicle": 1999999, "vehicle_name": "Kommo vehicle #1999999"})
case("source_enum_unknown", "statuses, enums, users", "source enum unknown to map and options -> no source",
     fields={SOURCE: _select(SOURCE, 2999999)}, expect={"source": None})
case("responsible_user_unknown", "statuses, enums, users", "responsible user not in kommo_user_map -> no owner",
     lead={"responsible_user_id": 999}, expect={"owner": None})

# contacts
case("no_contacts_embedded", "contacts", "no `_embedded.contacts` -> imported without a client "
     "(warning all_leads_have_contact)", lead={"_embedded": {"tags": []}}, contact=None, expect={"client": None})
case("contacts_empty", "contacts", "contacts [] -> imported without a client",
     lead={"_embedded": {"contacts": []}}, contact=None, expect={"client": None})
case("embedded_not_object", "contacts", "`_embedded` a list -> imported without a client",
     lead={"_embedded": []}, contact=None, expect={"client": None})
case("contact_deleted", "contacts", "main contact deleted in Kommo -> imported without a client "
     "(counted in contacts_missing_in_kommo)", lead={"_embedded": {"contacts": [{"id": MISSING_CONTACT, "is_main": True}]}},
     contact=None, expect={"client": None})
case("contact_without_is_main", "contacts", "no contact flagged is_main -> the first one",
     lead={"_embedded": {"contacts": [{"id": SHARED_CONTACT}]}}, contact=None,
     expect={"client": SHARED_CONTACT})
case("contact_main_not_first", "contacts", "the is_main contact wins over the first",
     lead={"_embedded": {"contacts": [{"id": MISSING_CONTACT, "is_main": False}, {"id": SHARED_CONTACT, "is_main": True}]}},
     contact=None, expect={"client": SHARED_CONTACT})
case("contact_id_as_string", "contacts", "contact id as a string -> used",
     lead={"_embedded": {"contacts": [{"id": str(SHARED_CONTACT), "is_main": True}]}}, contact=None,
     expect={"client": SHARED_CONTACT})
case("contact_id_beyond_bigint", "contacts", "contact id beyond bigint -> ignored: no client",
     lead={"_embedded": {"contacts": [{"id": 2**63, "is_main": True}]}}, contact=None, expect={"client": None})
case("contact_without_phone_or_email", "contacts", "a contact without phone and email -> client with both null",
     contact=lambda n: good_contact(n, custom_fields_values=None),
     expect={"client_phone": None, "client_email": None})
case("contact_field_code_lowercase", "contacts", "field_code `phone` in lower case -> phone read",
     contact=lambda n: good_contact(n, custom_fields_values=[
         {"field_code": "phone", "field_type": "multitext", "values": [{"value": "+34 612 000 111"}]}]),
     expect={"client_phone": "+34 612 000 111", "client_email": None})
case("contact_localized_field_without_code", "contacts", "a multitext `Телефон` without field_code -> phone read",
     contact=lambda n: good_contact(n, custom_fields_values=[
         {"field_name": "Телефон", "field_code": None, "field_type": "multitext",
          "values": [{"value": "+7 916 000 11 22"}]}]), expect={"client_phone": "+7 916 000 11 22"})
case("contact_malformed_fields", "contacts", "contact fields that are not lists/objects -> null phone/email",
     contact=lambda n: good_contact(n, custom_fields_values=[{"field_code": "PHONE", "values": "+49"}, "x", 3]),
     expect={"client_phone": None, "client_email": None})
case("contact_name_from_first_last", "contacts", "no name -> first_name + last_name",
     contact=lambda n: good_contact(n, name=None, first_name="Ana", last_name="Núñez"),
     expect={"client_name": "Ana Núñez"})
case("contact_without_any_name", "contacts", "no name at all -> client name null",
     contact=lambda n: good_contact(n, name=None, first_name="", last_name=None), expect={"client_name": None})
case("contact_email_very_long", "contacts", "email of 300 characters -> cut to 255",
     contact=lambda n: good_contact(n, custom_fields_values=[
         {"field_code": "EMAIL", "values": [{"value": "a" * 288 + "@example.com"}]}]),
     expect={"client_email": "a" * 255})
case("contact_sql_name", "contacts", "SQL in the contact name -> stored verbatim (parameters are bound)",
     contact=lambda n: good_contact(n, name="x'); DELETE FROM clients; --"),
     expect={"client_name": "x'); DELETE FROM clients; --"})

# names
case("name_null", "names", "name null -> null; the calendar shows the lead code", lead={"name": None},
     expect={"name": None, "calendar_title": "code"})
case("name_missing", "names", "no name key -> null", lead={"name": DELETE}, expect={"name": None})
case("name_blank", "names", "name of spaces -> null", lead={"name": "   \t "}, expect={"name": None})
case("name_unicode", "names", "emoji, Arabic, CJK, combining marks -> stored unchanged",
     lead={"name": "Zoë 🚗 Müller — عربى 漢字 e\u0301"}, expect={"name": "Zoë 🚗 Müller — عربى 漢字 e\u0301"})
case("name_very_long", "names", "100,000 characters -> cut to 1,000", lead={"name": "Ж" * 100_000},
     expect={"name": "Ж" * 1000})
case("name_control_characters", "names", "NUL and other control characters -> removed (tab, newline kept)",
     lead={"name": "A\x00B\x07C\tD\nE\x1b"}, expect={"name": "ABC\tD\nE"})
case("name_lone_surrogate", "names", "an unpaired UTF-16 surrogate -> removed", lead={"name": "\ud800Lone"},
     expect={"name": "Lone"})
case("name_sql", "names", "SQL in the name -> stored verbatim; nothing executed",
     lead={"name": "Robert'); DROP TABLE bookings; --"}, expect={"name": "Robert'); DROP TABLE bookings; --"})
case("name_number", "names", "a number as name -> its text", lead={"name": 12345}, expect={"name": "12345"})

# prices
case("price_string", "prices", "\"1500\" -> 1500", lead={"price": "1500"}, expect={"price": Decimal("1500.00")})
case("price_string_with_separators", "prices", "\"1 234,50\" -> 1234.50", lead={"price": "1 234,50"},
     expect={"price": Decimal("1234.50")})
case("price_float", "prices", "99.99 -> 99.99", lead={"price": 99.99}, expect={"price": Decimal("99.99")})
case("price_more_decimals", "prices", "10.555 -> rounded to cents (10.56)", lead={"price": 10.555},
     expect={"price": Decimal("10.56")})
case("price_negative", "prices", "negative -> null", lead={"price": -100}, expect={"price": None})
case("price_null", "prices", "null -> null", lead={"price": None}, expect={"price": None})
case("price_text", "prices", "\"free\" -> null", lead={"price": "free"}, expect={"price": None})
case("price_bool", "prices", "true -> null", lead={"price": True}, expect={"price": None})
case("price_too_large", "prices", "1e15 (beyond numeric(14,2)) -> null", lead={"price": 10**15},
     expect={"price": None})

# hostile input: over-long digit strings, deep nesting, control characters in option labels
HOSTILE = "hostile input"
case("id_too_many_digits", HOSTILE, "lead id of 5,000 digits (int() refuses it) -> skipped (`invalid`)",
     lead={"id": LONG_DIGITS}, skipped="invalid")
case("status_too_many_digits", HOSTILE, "status id of 5,000 digits -> no status: booking `pending`",
     lead={"status_id": LONG_DIGITS}, expect={"status": "pending", "kommo_status_id": None})
case("responsible_user_too_many_digits", HOSTILE, "responsible_user_id of 5,000 digits -> no owner",
     lead={"responsible_user_id": LONG_DIGITS}, expect={"owner": None})
case("cf_enum_id_too_many_digits", HOSTILE, "vehicle enum_id of 5,000 digits -> no vehicle",
     fields={VEHICLE: _select(VEHICLE, LONG_DIGITS)}, expect={"vehicle": None})
case("cf_field_id_too_many_digits", HOSTILE, "a field whose field_id has 5,000 digits is no field this project "
     "reads; the others are read", fields={999002: {**_select(999002, 1), "field_id": LONG_DIGITS}},
     expect={"vehicle": KNOWN_VEHICLE, "start_at": T_AT})
case("contact_id_too_many_digits", HOSTILE, "main contact id of 5,000 digits -> ignored: no client",
     lead={"_embedded": {"contacts": [{"id": LONG_DIGITS, "is_main": True}]}}, contact=None, expect={"client": None})
case("contact_payload_id_too_many_digits", HOSTILE, "Kommo answers the main contact with an id of 5,000 digits "
     "-> not that contact: no client (counted in contacts_missing_in_kommo)",
     contact=lambda n: good_contact(n, id=LONG_DIGITS), expect={"client": None})
case("nested_too_deep", HOSTILE, f"a field nested 100 levels deep (Kommo's records: about 7) -> skipped "
     f"(`invalid_lead`: more than {MAX_NESTING} levels)", fields=deep_field(100), skipped="invalid_lead")
case("contact_nested_too_deep", HOSTILE, "the main contact nested 100 levels deep -> skipped "
     "(`invalid_contact`): no client", contact=lambda n: good_contact(n, _embedded=nested(100)),
     expect={"client": None})
case("cf_enum_label_nul", HOSTILE, "NUL in a select value's label on the lead -> vehicle read by its enum id",
     fields={VEHICLE: {**_select(VEHICLE, KNOWN_VEHICLE), "values": [{"value": "A\x00B", "enum_id": KNOWN_VEHICLE}]}},
     expect={"vehicle": KNOWN_VEHICLE})
case("vehicle_option_label_control_characters", HOSTILE, "the vehicle option's label (field definition) with "
     "NUL and other control characters -> vehicle named with them removed",
     fields={VEHICLE: _select(VEHICLE, NUL_LABEL_VEHICLE)},
     expect={"vehicle": NUL_LABEL_VEHICLE, "vehicle_name": "Fiat 500 \u00b7 AB123CD"})
case("vehicle_option_label_only_control_characters", HOSTILE, "an option label of nothing but control "
     "characters -> no label: vehicle created as `Kommo vehicle #<id>`",
     fields={VEHICLE: _select(VEHICLE, BLANK_LABEL_VEHICLE)},
     expect={"vehicle": BLANK_LABEL_VEHICLE, "vehicle_name": f"Kommo vehicle #{BLANK_LABEL_VEHICLE}"})
case("source_option_label_control_characters", HOSTILE, "the source option's label with NUL and control "
     "characters -> source with them removed", fields={SOURCE: _select(SOURCE, NUL_LABEL_SOURCE)},
     expect={"source": "Website"})

# duplicates (the old copy is listed in November, the new one in January: two slices, see corpus_run)
DUPLICATE_N = next(_n)
DUPLICATE_OLD = good_lead(DUPLICATE_N, name="old version", updated_at=CREATED)
DUPLICATE_NEW = good_lead(DUPLICATE_N, name="new version", updated_at=CREATED + 86400)
CASES.append(Case("duplicate_id_across_pages", "duplicates", "the same id on two pages (data moved) -> "
                  "staged once, the most recently updated version kept", DUPLICATE_N,
                  DUPLICATE_NEW, good_contact(DUPLICATE_N), expect={"name": "new version"}))
SAME_PAGE = case("duplicate_id_on_one_page", "duplicates", "the same lead twice in a row -> staged once "
                 "(`duplicate` counted)", expect={"name": "Corpus lead"})
SAME_PAGE.payload["name"] = "Corpus lead"

# --- the run --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    leads: dict[str, dict]  # lead code -> production columns (sales lead, booking, client)
    staged: Counter  # lead id -> staged rows
    skipped: dict[str, int]
    base_skipped: Counter
    checks: dict[str, int]
    undated_staged: set[int]
    metadata: dict
    tables: set[str]
    base: dict[str, int]  # the warning counts the run must report, from the database's own view
    options: dict[tuple[int, int], str]  # (field id, enum id) -> the option's label as staged


def _ordered_entries() -> list[tuple[Any, int]]:
    """(payload, created_at the server lists it by): all at CREATED, but for the old copy of the duplicate,
    listed in the last slice of the window, whatever its payload says."""
    entries = [(DUPLICATE_OLD, LATE)]
    for item in CASES:
        if item.name == "duplicate_id_across_pages":
            continue
        entries.append((item.payload, CREATED))
        if item is SAME_PAGE:
            entries.append((item.payload, CREATED))
    entries.append((DUPLICATE_NEW, CREATED))
    return entries


@pytest.fixture(scope="module")
def corpus_run(pg_admin_url, template_url) -> Result:
    name, url = create_database(pg_admin_url, database_name(template_url), prefix="kommo_corpus")
    owner = uuid.uuid4()
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO kommo_user_map (kommo_user_id, owner_id) VALUES (%s, %s)", (OWNER_USER, owner))
    sim = KommoSimulator(SimulatorConfig(leads=300, seed=21, token=f"corpus-{uuid.uuid4().hex}"))
    try:
        with sim, pytest.MonkeyPatch.context() as mp:
            base = expected_snapshot(sim)
            ordinary = [lead for lead in sim.dataset.iter_leads() if WINDOW[0] <= lead["created_at"] < WINDOW[1]]
            base_skipped = Counter(excluded_status=sum(1 for lead in ordinary if lead["status_id"] == LOST))
            base_counts = {
                "undated": sum(1 for e in base.values() if e["is_booking"] and e["start_at"] is None),
                "unmapped": sum(1 for e in base.values() if e["is_booking"] and e["status_id"] not in STATUS_MAP),
                "no_contact": sum(1 for lead in ordinary
                                  if lead["status_id"] != LOST and not lead["_embedded"]["contacts"]),
            }
            for payload, created in _ordered_entries():
                sim.dataset.put_raw_lead(payload, created_at=created)
            sim.dataset.put_raw_contact(SHARED_CONTACT, good_contact(SHARED_CONTACT - CONTACT_BASE))
            for field_id, options in EXTRA_OPTIONS.items():
                # the account's field definition with the corpus's options added, served as Kommo sends it
                definition = sim.dataset.field(field_id)
                definition["enums"] = [*definition["enums"], *options]
                sim.add_fault(kind="status", status=200, path=f"/api/v4/leads/custom_fields/{field_id}",
                              path_exact=True, times=-1, body=json.dumps(definition),
                              content_type="application/hal+json")
            for item in CASES:
                if item.contact is not None:
                    sim.dataset.put_raw_contact(contact_id(item.n), item.contact)
            # the slice reaching the end of the window (the old copy of the duplicate) answers last, as
            # when data moved while paging
            sim.add_fault(kind="slow", path="/api/v4/leads", query={"filter[created_at][to]": str(WINDOW[1] - 1)},
                          delay_s=0.5, times=-1)
            set_code_location_env(mp, url, sim)
            result = run()
            assert result.success, step_failure(result)
            yield _collect(url, result, base, base_skipped, base_counts, owner)
    finally:
        drop_database(pg_admin_url, name)


def _collect(url: str, result, base: dict, base_skipped: Counter, base_counts: dict,
             owner: uuid.UUID) -> Result:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """SELECT sl.lead_code, sl.name, sl.value_amount, sl.stage_id, sl.kommo_created_at,
                      b.id IS NOT NULL, b.status, b.kommo_status_id, b.source, b.start_at, b.end_at,
                      v.kommo_vehicle_id, v.name, c.kommo_contact_id, c.name, c.phone, c.email,
                      b.owner_id = %s, b.owner_id IS NULL, e.title
                 FROM sales_leads sl
                 LEFT JOIN bookings b ON b.sales_lead_id = sl.id
                 LEFT JOIN vehicles v ON v.id = b.vehicle_id
                 LEFT JOIN clients c ON c.id = sl.client_id
                 LEFT JOIN calendar_events_expanded e ON e.booking_id = b.id""",
            (owner,),
        ).fetchall()
        keys = ("name", "price", "stage_id", "kommo_created_at", "booking", "status", "kommo_status_id", "source",
                "start_at", "end_at", "vehicle", "vehicle_name", "client", "client_name", "client_phone",
                "client_email", "owner_is_mapped", "owner_is_null", "calendar_title")
        leads = {row[0]: dict(zip(keys, row[1:], strict=True)) for row in rows}
        run_id = result.run_id
        staged = Counter(dict(conn.execute(
            "SELECT lead_id, count(*) FROM stg_kommo_leads WHERE run_id = %s GROUP BY lead_id", (run_id,)).fetchall()))
        undated = {r[0] for r in conn.execute(
            """SELECT lead_id FROM stg_kommo_leads WHERE run_id = %s AND delivery_at IS NULL AND collect_at IS NULL
                  AND coalesce(status_id, 0) NOT IN (79790631, 91703923, 143)""", (run_id,))}
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        options = {(r[0], r[1]): r[2] for r in conn.execute(
            "SELECT field_id, enum_id, value FROM stg_kommo_field_options WHERE run_id = %s", (run_id,))}
        vehicle_enums = conn.execute(
            """SELECT count(DISTINCT vehicle_enum_id) FROM stg_kommo_leads
                WHERE run_id = %s AND vehicle_enum_id IS NOT NULL
                  AND coalesce(status_id, 0) NOT IN (79790631, 91703923, 143)""", (run_id,)).fetchone()[0]
    checks = {
        evaluation.check_name: evaluation.metadata["count"].value
        for evaluation in result.get_asset_check_evaluations()
        if "count" in evaluation.metadata
    }
    metadata = materializations(result)
    assert set(base) <= set(leads)  # the ordinary leads are all there
    return Result(leads, staged, metadata["stg_kommo_leads"]["skipped"], base_skipped, checks, undated,
                  metadata, tables, {**base_counts, "vehicle_enums": vehicle_enums}, options)


# --- one test per case ----------------------------------------------------------------------------


def test_the_corpus_has_at_least_forty_cases():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)




@pytest.mark.parametrize(
    "item", [pytest.param(c, id=c.name)
             for c in CASES])
def test_case(corpus_run: Result, item: Case):
    if item.skipped:
        assert item.lead_code not in corpus_run.leads
        if isinstance(item.payload, dict) and isinstance(item.payload.get("id"), int) and item.payload["id"] > 0:
            assert corpus_run.staged[item.payload["id"]] == 0
        wanted = sum(1 for c in CASES if c.skipped == item.skipped) + corpus_run.base_skipped[item.skipped]
        assert corpus_run.skipped.get(item.skipped) == wanted, corpus_run.skipped
        return
    got = corpus_run.leads.get(item.lead_code)
    assert got is not None, f"{item.lead_code} was not imported"
    assert corpus_run.staged[lead_id(item.n)] == 1
    expect = dict(item.expect)
    if expect.pop("booking", True):
        assert got["booking"], "no booking"
    else:
        assert not got["booking"]
    owner = expect.pop("owner", "mapped")
    if got["booking"]:
        assert got["owner_is_mapped"] if owner == "mapped" else got["owner_is_null"]
    if expect.pop("calendar_title", None) == "code":
        assert got["calendar_title"] == item.lead_code
    if item.contact is not None:  # linked to its own (crafted) contact unless the case says otherwise
        expect.setdefault("client", contact_id(item.n))
    for column, value in expect.items():
        assert got[column] == value, (column, got[column], value)
    assert (lead_id(item.n) in corpus_run.undated_staged) == item.undated


# --- what the run reports about the corpus --------------------------------------------------------


def test_duplicates_are_counted(corpus_run: Result):
    assert corpus_run.skipped.get("duplicate") == 2


UNMAPPED_STATUS = ("status_unknown", "status_missing", "status_beyond_bigint", "status_too_many_digits")
NO_CONTACT_ID = ("no_contacts_embedded", "contacts_empty", "embedded_not_object", "contact_id_beyond_bigint",
                 "contact_id_too_many_digits")


def test_undated_bookings_are_counted_by_the_warning_check(corpus_run: Result):
    corpus = {lead_id(c.n) for c in CASES if c.undated}
    assert corpus <= corpus_run.undated_staged
    assert corpus_run.checks["all_bookings_dated"] == corpus_run.base["undated"] + len(corpus)


def test_unmapped_statuses_are_counted_by_the_warning_check(corpus_run: Result):
    assert corpus_run.checks["all_statuses_mapped"] == corpus_run.base["unmapped"] + len(UNMAPPED_STATUS)


def test_leads_without_a_contact_are_counted_by_the_warning_check(corpus_run: Result):
    assert corpus_run.checks["all_leads_have_contact"] == corpus_run.base["no_contact"] + len(NO_CONTACT_ID)


def test_unknown_vehicles_are_created_and_counted_by_the_warning_check(corpus_run: Result):
    # a fresh production has no vehicles: every distinct enum of a booking is created, 1999999 (unknown
    # to the field's options) among them
    created = corpus_run.metadata["vehicles"]["vehicles_created"]
    assert created == corpus_run.base["vehicle_enums"]
    assert corpus_run.checks["no_vehicles_to_create"] == created


def test_the_vehicles_warning_counts_what_the_swap_creates(corpus_run: Result):
    assert corpus_run.checks["no_vehicles_to_create"] == corpus_run.metadata["vehicles"]["vehicles_created"]


def test_a_deleted_contact_is_counted_as_missing(corpus_run: Result):
    assert corpus_run.metadata["stg_kommo_contacts"]["contacts_missing_in_kommo"] >= 1


def test_a_contact_nested_too_deep_is_skipped_and_counted(corpus_run: Result):
    assert corpus_run.skipped.get("invalid_contact") == 1, corpus_run.skipped


def test_option_labels_are_staged_clean_and_options_without_a_readable_id_left_out(corpus_run: Result):
    options = corpus_run.options
    assert options[(VEHICLE, NUL_LABEL_VEHICLE)] == "Fiat 500 \u00b7 AB123CD"
    assert options[(SOURCE, NUL_LABEL_SOURCE)] == "Website"
    assert (VEHICLE, BLANK_LABEL_VEHICLE) not in options  # nothing left of its label: the placeholder names it
    assert "an option whose id has 5,000 digits" not in options.values()
    assert (VEHICLE, KNOWN_VEHICLE) in options and (SOURCE, KNOWN_SOURCE) in options  # the account's own
    assert not any(ch in label for label in options.values() for ch in "\x00\x07\x1b\x1f")


def test_sql_in_names_executed_nothing(corpus_run: Result):
    assert {"bookings", "clients", "sales_leads"} <= corpus_run.tables
    assert len(corpus_run.leads) > 240


def test_the_parser_bounds_match_the_staging_columns(database_url):
    """The largest id and amount the parser accepts fit bigint and numeric(14, 2); one more is refused by
    the parser (so it becomes null or a skipped lead), never by the COPY that would fail the run."""
    assert positive_int(MAX_ID) == MAX_ID and positive_int(MAX_ID + 1) is None
    assert positive_int(str(MAX_ID + 1)) is None and positive_int(float(2**64)) is None
    assert parse_amount("999999999999.99") == MAX_AMOUNT
    assert parse_amount("999999999999.994") is not None
    assert parse_amount("999999999999.995") is None and parse_amount(10**15) is None
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TEMP TABLE bounds (id bigint, amount numeric(14, 2))")
        conn.execute("INSERT INTO bounds VALUES (%s, %s), (%s, %s)",
                     (positive_int(MAX_ID), parse_amount("999999999999.99"), 1, parse_amount("999999999999.994")))
        with pytest.raises(psycopg.errors.NumericValueOutOfRange):
            conn.execute("INSERT INTO bounds VALUES (%s, %s)", (1, Decimal("999999999999.995")))


def test_staging_skips_a_record_nested_beyond_the_recursion_limit(database_url):
    """Deeper than the simulator can serve (it copies raw entries recursively): a lead and a contact nested
    2,000 levels, with a NUL deep inside, go to the staging writer as the client hands them over. Storing
    them used to raise RecursionError (json.dumps of the payload), which failed the run; now each is skipped
    and counted, and the page's other records are staged."""
    from kommo_assets.db import runs
    from kommo_assets.db.staging import StagingWriter
    from kommo_assets.scope import window_for

    run_id = str(uuid.uuid4())
    runs.start_run(database_url, run_id=run_id, dagster_run_id=None, job_name="t", triggered_by=None,
                   dry_run=True, window=window_for(2025), max_drop_ratio=0.3)
    lead_deep = good_lead(900, notes=[nested(1999), "\x00"])
    skipped: Counter = Counter()
    with psycopg.connect(database_url) as conn:
        writer = StagingWriter(conn, run_id)
        written = writer.write_leads([lead_deep, good_lead(901)], skipped)
        added_contacts = writer.write_contacts([good_contact(900, _embedded=nested(2000)), good_contact(901)],
                                               skipped)
    assert skipped == {"invalid_lead": 1, "invalid_contact": 1}
    assert (written.added, added_contacts) == (1, 1)
    with psycopg.connect(database_url) as conn:
        staged = conn.execute("SELECT lead_id FROM stg_kommo_leads WHERE run_id = %s", (run_id,)).fetchall()
    assert staged == [(lead_id(901),)]
