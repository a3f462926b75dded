"""A thin, backend-neutral cursor: SQL is written once with `?` placeholders.

SQLite (qmark) and psycopg (format) differ only in placeholders and row types; everything the
read model runs is portable SQL (upserts with ON CONFLICT, LIMIT/OFFSET), so one adapter covers
both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol


class RawCursor(Protocol):
    @property
    def description(self) -> Any: ...

    def execute(self, *args: Any, **kwargs: Any) -> Any: ...

    def executemany(self, *args: Any, **kwargs: Any) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> Any: ...


class Db:
    """Runs portable SQL on one backend cursor inside a transaction someone else owns."""

    def __init__(self, cursor: RawCursor, paramstyle: Literal["qmark", "format"]) -> None:
        self.cursor = cursor
        self.paramstyle = paramstyle

    def _sql(self, sql: str) -> str:
        if self.paramstyle == "format":
            return sql.replace("%", "%%").replace("?", "%s")
        return sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.cursor.execute(self._sql(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        # Both drivers take any sequence per row: the rows are passed as they come, not copied
        # into tuples (a rebuild writes hundreds of thousands).
        rows = rows if isinstance(rows, list) else list(rows)
        if rows:
            self.cursor.executemany(self._sql(sql), rows)

    def _tuple(self, row: Any) -> tuple[Any, ...]:
        return tuple(row.values()) if isinstance(row, dict) else tuple(row)

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        self.execute(sql, params)
        row = self.cursor.fetchone()
        return None if row is None else self._tuple(row)

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.one(sql, params)
        return None if row is None else row[0]

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self.execute(sql, params)
        return [self._tuple(r) for r in self.cursor.fetchall()]

    def dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self.execute(sql, params)
        names = [d[0] for d in self.cursor.description]
        return [dict(zip(names, self._tuple(r), strict=True)) for r in self.cursor.fetchall()]
