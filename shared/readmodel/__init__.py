"""The read side: projections of the event stream into SQLite or PostgreSQL, for dashboards.

`store` owns the tables and the tracking position, `fold` says what each event means for them,
`runner` feeds them from the application recorder's subscription, `queries` reads them.
"""

from shared.readmodel.store import (
    APPLICATION,
    ReadModel,
    StoreURLError,
    configured_url,
    default_url,
    open_read_model,
)

__all__ = ["APPLICATION", "ReadModel", "StoreURLError", "configured_url", "default_url", "open_read_model"]
