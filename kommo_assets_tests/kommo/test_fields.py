"""Tests of the Kommo payload parsers: every shape Kommo sends, and the malformed ones it might."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from kommo_assets.kommo.errors import InvalidPayload
from kommo_assets.kommo.fields import (
    COLLECT_FIELD_ID,
    DELIVERY_FIELD_ID,
    MAX_ID,
    MAX_NESTING,
    SOURCE_FIELD_ID,
    VEHICLE_FIELD_ID,
    StagedContact,
    clean_text,
    custom_field_values,
    extract_kommo_epoch,
    first_value,
    main_contact_id,
    nesting_exceeds,
    parse_amount,
    positive_int,
    sanitize_payload,
    select_enum_id,
    staged_contact,
    staged_lead,
)

DEC_12 = datetime(2024, 12, 12, 14, 0, tzinfo=UTC)  # 1734012000


def lead_with_fields(*fields: dict, **extra: object) -> dict:
    return {"id": 1, "custom_fields_values": list(fields), **extra}


def cf(field_id: object, *values: object, **extra: object) -> dict:
    return {"field_id": field_id, "values": list(values), **extra}


# --- extract_kommo_epoch -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1734012000, DEC_12),
        (1734012000.0, DEC_12),
        ("1734012000", DEC_12),
        (" 1734012000 ", DEC_12),
        ("1734012000.0", DEC_12),
        (1734012000000, DEC_12),  # milliseconds
        ("1734012000000", DEC_12),
        (Decimal("1734012000"), DEC_12),
        ({"value": 1734012000}, DEC_12),
        ({"value": "1734012000"}, DEC_12),
        ([{"value": 1734012000}], DEC_12),
        ("2024-12-12T14:00:00Z", DEC_12),
        ("2024-12-12T17:00:00+03:00", DEC_12),
        ("2024-12-12T14:00:00.000+00:00", DEC_12),
        ("2024-12-12 14:00:00", DEC_12),  # naive text is UTC
        ("2024-12-12", datetime(2024, 12, 12, tzinfo=UTC)),
        (date(2024, 12, 12), datetime(2024, 12, 12, tzinfo=UTC)),
        (datetime(2024, 12, 12, 14, 0), DEC_12),
        (1734012000.5, datetime(2024, 12, 12, 14, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_extract_kommo_epoch_reads_every_shape(value: object, expected: datetime) -> None:
    result = extract_kommo_epoch(value)
    assert result == expected
    assert result is not None and result.utcoffset() is not None and result.utcoffset().total_seconds() == 0


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        0,
        "0",
        0.0,
        -1734012000,
        "-1734012000",
        True,
        False,
        float("nan"),
        float("inf"),
        "nan",
        "yesterday",
        "2025-13-45",
        "12/03/2025",
        "1e9",
        {"value": None},
        {},
        [],
        {"value": {"value": {"value": {"value": {"value": 1734012000}}}}},  # absurdly deep
        86400,  # 1970-01-02: a wrong unit, not a booking
        946684799,  # 1999-12-31T23:59:59Z: just before 2000
        4133980800,  # 2101-01-01: absurd
        "2150-01-01",
        10**30,
        object(),
    ],
)
def test_extract_kommo_epoch_rejects_without_raising(value: object) -> None:
    assert extract_kommo_epoch(value) is None


def test_extract_kommo_epoch_accepts_the_year_bounds() -> None:
    assert extract_kommo_epoch(946684800) == datetime(2000, 1, 1, tzinfo=UTC)
    assert extract_kommo_epoch("2100-12-31T23:59:59Z") == datetime(2100, 12, 31, 23, 59, 59, tzinfo=UTC)


# --- custom fields -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entity", "expected"),
    [
        (lead_with_fields(cf(VEHICLE_FIELD_ID, {"value": "Van", "enum_id": 55})), 55),
        (lead_with_fields(cf(VEHICLE_FIELD_ID, {"value": "Van", "enum_id": "55"})), 55),
        (lead_with_fields(cf(str(VEHICLE_FIELD_ID), {"value": "Van", "enum_id": 55})), 55),
        (lead_with_fields(cf(VEHICLE_FIELD_ID, {"value": "Van", "enum_id": 55.0})), 55),
        (lead_with_fields(cf(VEHICLE_FIELD_ID, {"value": "Van", "enum_id": "abc"})), None),
        (lead_with_fields(cf(VEHICLE_FIELD_ID, {"value": "Van", "enum_id": None})), None),
        (lead_with_fields(cf(VEHICLE_FIELD_ID, {"value": "Van", "enum_id": True})), None),
        (lead_with_fields(cf(VEHICLE_FIELD_ID, {"value": "Van", "enum_id": -5})), None),
        (lead_with_fields(cf(VEHICLE_FIELD_ID, {"value": "Van"})), None),
        (lead_with_fields(cf(VEHICLE_FIELD_ID)), None),
        (lead_with_fields(cf(VEHICLE_FIELD_ID, "not a dict", {"enum_id": 7})), 7),
        (lead_with_fields({"field_id": VEHICLE_FIELD_ID, "values": None}), None),
        (lead_with_fields({"field_id": VEHICLE_FIELD_ID}), None),
        (lead_with_fields(cf(SOURCE_FIELD_ID, {"enum_id": 9})), None),  # another field only
        (lead_with_fields("garbage", None, cf(VEHICLE_FIELD_ID, {"enum_id": 3})), 3),
        ({"id": 1, "custom_fields_values": None}, None),
        ({"id": 1, "custom_fields_values": "oops"}, None),
        ({"id": 1, "custom_fields_values": {"field_id": VEHICLE_FIELD_ID}}, None),
        ({"id": 1}, None),
        ("not a lead", None),
        (lead_with_fields(cf(VEHICLE_FIELD_ID, {"enum_id": 11}, {"enum_id": 12})), 11),
    ],
)
def test_select_enum_id(entity: dict, expected: int | None) -> None:
    assert select_enum_id(entity, VEHICLE_FIELD_ID) == expected


def test_custom_field_values_takes_the_first_occurrence_with_values() -> None:
    entity = lead_with_fields(cf(DELIVERY_FIELD_ID), cf(DELIVERY_FIELD_ID, {"value": 1}, 5))
    assert custom_field_values(entity, DELIVERY_FIELD_ID) == [{"value": 1}]
    assert first_value(entity, DELIVERY_FIELD_ID) == 1
    assert first_value(entity, COLLECT_FIELD_ID) is None


@pytest.mark.parametrize(
    ("lead", "expected"),
    [
        ({"_embedded": {"contacts": [{"id": 1, "is_main": False}, {"id": 2, "is_main": True}]}}, 2),
        ({"_embedded": {"contacts": [{"id": 1, "is_main": False}, {"id": 2, "is_main": False}]}}, 1),
        ({"_embedded": {"contacts": [{"id": 1}]}}, 1),
        ({"_embedded": {"contacts": [{"id": "42", "is_main": True}]}}, 42),
        ({"_embedded": {"contacts": [{"id": None, "is_main": True}, {"id": 5}]}}, 5),
        ({"_embedded": {"contacts": [{"id": 3, "is_main": "true"}, {"id": 4, "is_main": True}]}}, 4),
        ({"_embedded": {"contacts": ["x", {"is_main": True}]}}, None),
        ({"_embedded": {"contacts": []}}, None),
        ({"_embedded": {"contacts": None}}, None),
        ({"_embedded": {"tags": [], "companies": []}}, None),  # fetched without with=contacts
        ({"_embedded": None}, None),
        ({}, None),
        (None, None),
    ],
)
def test_main_contact_id(lead: dict, expected: int | None) -> None:
    assert main_contact_id(lead) == expected


# --- text and amounts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  Ivan  ", "Ivan"),
        ("Iv\x00an", "Ivan"),
        ("a\x01b\x07c\x1fd\re", "abcde"),
        ("line1\nline2\tend", "line1\nline2\tend"),
        ("Пётр Иванов 🚐", "Пётр Иванов 🚐"),
        ("Robert'); DROP TABLE clients;--", "Robert'); DROP TABLE clients;--"),
        ("\x00\x00  ", None),
        ("", None),
        (None, None),
        (12345, "12345"),
        (b"caf\xc3\xa9", "café"),
        ("bad \ud800 surrogate", "bad  surrogate"),
    ],
)
def test_clean_text(value: object, expected: str | None) -> None:
    assert clean_text(value) == expected


def test_clean_text_truncates_long_text() -> None:
    assert clean_text("x" * 10_000) == "x" * 1000
    assert clean_text("abc def", max_len=4) == "abc"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1500, Decimal("1500")),
        (0, Decimal("0")),
        (1500.5, Decimal("1500.5")),
        (0.1, Decimal("0.1")),
        ("1500", Decimal("1500")),
        ("1500.50", Decimal("1500.50")),
        ("1500,50", Decimal("1500.50")),
        (" 1 500,50 ", Decimal("1500.50")),
        ("1,234.56", Decimal("1234.56")),
        ("1.234,56", Decimal("1234.56")),
        (Decimal("99.99"), Decimal("99.99")),
        (-1, None),
        ("-5", None),
        (-0.5, None),
        (float("nan"), None),
        (float("inf"), None),
        ("NaN", None),
        ("Infinity", None),
        (True, None),
        (None, None),
        ("", None),
        ("abc", None),
        ("12abc", None),
        ("1e5", None),
        ([100], None),
    ],
)
def test_parse_amount(value: object, expected: Decimal | None) -> None:
    assert parse_amount(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5),
        ("5", 5),
        (" 7 ", 7),
        (5.0, 5),
        ("5.0", 5),
        (0, None),
        (-3, None),
        (True, None),
        ("x", None),
        (5.5, None),
        (str(MAX_ID), MAX_ID),
        pytest.param("0" * 5000 + "42", 42, id="leading-zeros"),  # not significant
        ("+42.000", 42),
        (str(MAX_ID + 1), None),
        ("9" * 20, None),
        pytest.param("9" * 5000, None, id="5000-digits"),  # int() would raise: more than 4,300 digits
        pytest.param("-" + "9" * 5000, None, id="minus-5000-digits"),
        pytest.param("9" * 5000 + ".0", None, id="5000-digits-point-0"),
        pytest.param("0" * 100_000 + "x", None, id="100000-zeros-then-x"),
    ],
)
def test_positive_int(value: object, expected: int | None) -> None:
    assert positive_int(value) == expected


LONG_DIGITS = "9" * 5000


def test_over_long_digit_strings_are_unreadable_values_not_errors() -> None:
    """Python refuses int() of more than 4,300 digits; every parser reads such a value as unreadable."""
    with pytest.raises(ValueError, match="4300"):
        int(LONG_DIGITS)
    lead = {
        "id": 5, "status_id": LONG_DIGITS, "pipeline_id": LONG_DIGITS, "responsible_user_id": LONG_DIGITS,
        "price": LONG_DIGITS, "name": LONG_DIGITS, "created_at": LONG_DIGITS, "updated_at": LONG_DIGITS,
        "closed_at": "0." + LONG_DIGITS,
        "custom_fields_values": [
            {"field_id": LONG_DIGITS, "values": [{"enum_id": 1}]},  # no field has that id
            cf(VEHICLE_FIELD_ID, {"value": "Van", "enum_id": LONG_DIGITS}),
            cf(SOURCE_FIELD_ID, {"value": "Web", "enum_id": LONG_DIGITS + ".0"}),
            cf(DELIVERY_FIELD_ID, {"value": LONG_DIGITS}),
            cf(COLLECT_FIELD_ID, {"value": "-" + LONG_DIGITS}),
        ],
        "_embedded": {"contacts": [{"id": LONG_DIGITS, "is_main": True}, {"id": "8"}]},
    }
    staged = staged_lead(lead)
    assert staged.lead_id == 5
    assert (staged.status_id, staged.pipeline_id, staged.responsible_user_id) == (None, None, None)
    assert staged.vehicle_enum_id is None and staged.source_enum_id is None
    assert staged.delivery_at is None and staged.collect_at is None
    assert staged.created_at is None and staged.updated_at is None and staged.closed_at is None
    assert staged.price is None
    assert staged.contact_id == 8  # the unreadable main contact is passed over, as any unusable id
    assert staged.name == "9" * 1000


@pytest.mark.parametrize("entity_id", [LONG_DIGITS, "-" + LONG_DIGITS, LONG_DIGITS + ".0", 10**5000],
                         ids=["digits", "negative", "integral_float_text", "python_int"])
def test_a_lead_or_contact_whose_id_has_too_many_digits_is_invalid(entity_id: object) -> None:
    with pytest.raises(InvalidPayload, match="no usable id"):
        staged_lead({"id": entity_id})
    with pytest.raises(InvalidPayload, match="no usable id"):
        staged_contact({"id": entity_id})


def nested(levels: int, leaf: object = 1) -> object:
    value = leaf
    for level in range(levels):
        value = {"k": value} if level % 2 else [value]
    return value


def test_nesting_exceeds_measures_levels_without_recursion() -> None:
    assert not nesting_exceeds(1, 0) and not nesting_exceeds("x" * 10, 0)
    assert nesting_exceeds({}, 0) and not nesting_exceeds({}, 1) and not nesting_exceeds([], 1)
    assert not nesting_exceeds({"a": [1, {"b": 2}], "c": {}}, 3)
    assert nesting_exceeds({"a": [1, {"b": {}}], "c": {}}, 3)
    assert not nesting_exceeds(full_lead(), MAX_NESTING)
    assert not nesting_exceeds(nested(MAX_NESTING)) and nesting_exceeds(nested(MAX_NESTING + 1))
    # far deeper than Python's recursion limit: measured all the same
    assert nesting_exceeds(nested(200_000)) and not nesting_exceeds(nested(200_000), 200_000)


# --- staged rows ---------------------------------------------------------------------------------


def full_lead() -> dict:
    return {
        "id": 19030890,
        "name": "Booking \x00 for Ana",
        "price": 2500,
        "responsible_user_id": 8001,
        "status_id": 79790630,
        "pipeline_id": 5597036,
        "created_at": 1735732800,
        "updated_at": "1735736400",
        "closed_at": None,
        "is_deleted": False,
        "custom_fields_values": [
            cf(VEHICLE_FIELD_ID, {"value": "Sprinter", "enum_id": 894464, "enum_code": None}),
            cf(SOURCE_FIELD_ID, {"value": "Instagram", "enum_id": "771"}),
            cf(DELIVERY_FIELD_ID, {"value": 1734012000}),
            cf(COLLECT_FIELD_ID, {"value": "2024-12-13T14:00:00+00:00"}),
        ],
        "_embedded": {"contacts": [{"id": 5, "is_main": False}, {"id": 6, "is_main": True}]},
    }


def test_staged_lead_reads_every_column() -> None:
    staged = staged_lead(full_lead())
    assert staged.lead_id == 19030890
    assert staged.contact_id == 6
    assert staged.status_id == 79790630
    assert staged.pipeline_id == 5597036
    assert staged.responsible_user_id == 8001
    assert staged.price == Decimal("2500")
    assert staged.name == "Booking  for Ana"
    assert staged.vehicle_enum_id == 894464
    assert staged.source_enum_id == 771
    assert staged.delivery_at == DEC_12
    assert staged.collect_at == datetime(2024, 12, 13, 14, 0, tzinfo=UTC)
    assert staged.created_at == datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    assert staged.updated_at == datetime(2025, 1, 1, 13, 0, tzinfo=UTC)
    assert staged.closed_at is None


def test_staged_lead_tolerates_a_bare_lead() -> None:
    staged = staged_lead({"id": "77", "custom_fields_values": None, "price": "-3", "name": "x" * 5000})
    assert staged.lead_id == 77
    assert staged.contact_id is None and staged.vehicle_enum_id is None and staged.delivery_at is None
    assert staged.price is None
    assert staged.name == "x" * 1000


@pytest.mark.parametrize("lead", [{}, {"id": None}, {"id": 0}, {"id": "abc"}, {"id": True}, [], "lead", None])
def test_staged_lead_without_usable_id_is_invalid(lead: object) -> None:
    with pytest.raises(InvalidPayload):
        staged_lead(lead)  # type: ignore[arg-type]


def test_staged_contact_reads_name_phone_email() -> None:
    contact = {
        "id": 6,
        "name": " Ana  Silva ",
        "custom_fields_values": [
            {
                "field_code": "PHONE",
                "field_type": "multitext",
                "values": [
                    {"value": "", "enum_code": "WORK"},
                    {"value": "+351 912\x00 345", "enum_code": "MOB"},
                ],
            },
            {"field_code": "EMAIL", "field_type": "multitext", "values": [{"value": "ana@example.com"}]},
        ],
    }
    assert staged_contact(contact) == StagedContact(6, "Ana  Silva", "+351 912 345", "ana@example.com")


def test_staged_contact_fallbacks() -> None:
    contact = {
        "id": "8",
        "name": "",
        "first_name": "Ana",
        "last_name": "Silva",
        "custom_fields_values": [
            {
                "field_code": None,
                "field_type": "multitext",
                "field_name": "Телефон",
                "values": [{"value": "123"}],
            },
            {"field_code": "email", "field_type": "multitext", "values": [{"value": "a@b.c"}]},
            {"field_code": None, "field_type": "text", "field_name": "Email", "values": [{"value": "no@no"}]},
        ],
    }
    assert staged_contact(contact) == StagedContact(8, "Ana Silva", "123", "a@b.c")


def test_staged_contact_with_nothing_but_an_id() -> None:
    assert staged_contact({"id": 9, "custom_fields_values": None}) == StagedContact(9, None, None, None)
    assert staged_contact({"id": 9, "first_name": None, "last_name": "Solo"}).name == "Solo"


@pytest.mark.parametrize("contact", [{}, {"id": -1}, {"id": "x"}, None, 5])
def test_staged_contact_without_usable_id_is_invalid(contact: object) -> None:
    with pytest.raises(InvalidPayload):
        staged_contact(contact)  # type: ignore[arg-type]


def test_sanitize_payload_removes_what_jsonb_rejects_and_copies() -> None:
    payload = {
        "name": "A\x00B",
        "key\x00": [1, "x\x00y", {"deep": ["\x00"]}, ("t\x00",)],
        "nan": math.nan,
        "ok": True,
        "n": None,
        "price": 12.5,
        "bad": "\udc80",
    }
    cleaned = sanitize_payload(payload)
    assert cleaned == {
        "name": "AB",
        "key": [1, "xy", {"deep": [""]}, ["t"]],
        "nan": None,
        "ok": True,
        "n": None,
        "price": 12.5,
        "bad": "",
    }
    assert payload["name"] == "A\x00B"  # the original is untouched
    text = json.dumps(cleaned)
    assert "\\u0000" not in text and "NaN" not in text
