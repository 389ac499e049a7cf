"""The target database as a Dagster resource."""

import dagster as dg
import psycopg

from kommo_assets.db import connect


class PostgresResource(dg.ConfigurableResource):
    """The PostgreSQL database the refresh writes to (``KOMMO_DATABASE_URL``)."""

    database_url: str

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection:
        return connect(self.database_url, autocommit=autocommit)
