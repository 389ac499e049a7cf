"""The one way the project talks to PostgreSQL: psycopg 3 connections to ``KOMMO_DATABASE_URL``.

``with connect(url) as conn:`` commits on success, rolls back on an exception and closes the connection.
"""

import psycopg

APPLICATION_NAME = "kommo-assets"


def connect(url: str, *, autocommit: bool = False, application_name: str = APPLICATION_NAME) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=autocommit, application_name=application_name)
