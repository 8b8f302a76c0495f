"""Named files of the hub's state: in a folder of the state directory, or in a PostgreSQL table.

The model registry, the server optimizer's state and the hub's key are files: written
whole, read whole, listed and removed. :class:`FolderBlobs` keeps them on disk, each
written atomically; :class:`TableBlobs` keeps them in the ``files`` table of the hub's
PostgreSQL database, where replicas on other machines read what the leader wrote. A group
of files written together (:meth:`Blobs.write_many`) lands in order on disk (the last one,
a manifest, marks the group complete) and in one transaction in PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from hub.database import PostgresDatabase
from models.files import write_atomic

__all__ = ["Blobs", "FolderBlobs", "TableBlobs", "blobs_for"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, data {BLOB} NOT NULL);
"""


class Blobs:
    """Files by name (``a/b.ext``); ``where`` says where they live, for messages."""

    where: str

    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when there is none."""
        raise NotImplementedError

    def write_many(self, files: Mapping[str, bytes], doing: str) -> None:
        """Write these files, in order; each is whole or absent after a crash."""
        raise NotImplementedError

    def write(self, name: str, data: bytes, doing: str) -> None:
        self.write_many({name: data}, doing)

    def names(self, prefix: str = "") -> list[str]:
        """The names starting with ``prefix``, sorted."""
        raise NotImplementedError

    def delete(self, names: list[str]) -> None:
        """Remove these files (in order; missing ones are fine)."""
        raise NotImplementedError

    def path(self, name: str) -> Path | None:
        """The file's path on disk (None when it lives in a database)."""
        return None


class FolderBlobs(Blobs):
    """Files under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.where = str(self.root)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def write_many(self, files: Mapping[str, bytes], doing: str) -> None:
        for name, data in files.items():
            write_atomic(self.root / name, data, doing=doing)

    def names(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        found = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(n for n in found if n.startswith(prefix) and ".tmp" not in n)

    def delete(self, names: list[str]) -> None:
        folders = set()
        for name in names:
            (self.root / name).unlink(missing_ok=True)
            folders.add((self.root / name).parent)
        for folder in sorted(folders, reverse=True):
            if folder != self.root and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def path(self, name: str) -> Path | None:
        return self.root / name


class TableBlobs(Blobs):
    """Files in the ``files`` table of a PostgreSQL database, under ``prefix/`` (its own connection)."""

    def __init__(self, url: str, prefix: str) -> None:
        from hub.database import redact

        self.db = PostgresDatabase(url, SCHEMA)
        self.prefix = prefix.rstrip("/") + "/"
        self.where = f"{redact(url)} (files {self.prefix}*)"

    def read(self, name: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM files WHERE name = ?", (self.prefix + name,)).fetchone()
        return None if row is None else bytes(row[0])

    def write_many(self, files: Mapping[str, bytes], doing: str) -> None:
        self.db.begin(write=True)
        try:
            for name, data in files.items():
                self.db.execute("INSERT INTO files (name, data) VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                                " SET data = excluded.data", (self.prefix + name, data))
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise

    def names(self, prefix: str = "") -> list[str]:
        like = (self.prefix + prefix).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.db.execute("SELECT name FROM files WHERE name LIKE ? ORDER BY name", (like,)).fetchall()
        return [r[0][len(self.prefix):] for r in rows]

    def delete(self, names: list[str]) -> None:
        for name in names:
            self.db.execute("DELETE FROM files WHERE name = ?", (self.prefix + name,))

    def close(self) -> None:
        self.db.close()


def blobs_for(state: str | os.PathLike[str], folder: str) -> Blobs:
    """The files of ``folder`` (``models``, ``strategy``, ``keys``) of a state directory or database."""
    from hub.database import is_database_url

    if is_database_url(state):
        return TableBlobs(str(state), folder)
    return FolderBlobs(Path(state) / folder)
