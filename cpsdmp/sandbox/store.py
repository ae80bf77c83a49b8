# twisted.web, twisted.enterprise and twisted.application are not annotated.
# mypy: disable-error-code="no-untyped-call"
"""
The local DMP's storage, in SQLite: the patients that have a DMP, the
submission sets, the document entries (every metadata version, with the
ebRIM XML as submitted and the indexed columns that searches use), the
associations, and the documents themselves, byte for byte.

Every call runs on one database thread, off the reactor, and returns a
Deferred. A submission or an update is one SQLite transaction: it is stored
whole or not at all.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lxml import etree
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred

from cpsdmp.xds.answers import DmpRecord
from cpsdmp.xds.ebrim import (
    INS_OID_TEST,
    Association,
    DocumentEntry,
    PatientId,
    Status,
    SubmissionSet,
)
from cpsdmp.xds.transactions import DMP_REPOSITORY_ID

#: Patients with a DMP in every new sandbox. The first is the patient of the
#: ANS example CDAs (test INS-NIR), the second the one of the official TD0.2
#: example; the others are made up, with valid NIR keys, for tests and demos.
TEST_PATIENTS: tuple[DmpRecord, ...] = (
    DmpRecord(
        PatientId("279035121518989", INS_OID_TEST),
        "PAT-TROIS",
        "DOMINIQUE",
        "F",
        "19790328",
    ),
    DmpRecord(
        PatientId("207058575627097", INS_OID_TEST),
        "PATB-QUATRE",
        "LAURENCE",
        "M",
        "19070525",
    ),
    DmpRecord(
        PatientId("185127505612306", INS_OID_TEST),
        "SABLE-TEST",
        "PAUL",
        "M",
        "19851203",
    ),
    DmpRecord(
        PatientId("292046912304543", INS_OID_TEST),
        "GRANIT-TEST",
        "LUCIE",
        "F",
        "19920417",
    ),
    DmpRecord(
        PatientId("163091305507770", INS_OID_TEST),
        "ARGILE-TEST",
        "ANDRE",
        "M",
        "19630921",
    ),
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    ins TEXT NOT NULL,
    authority TEXT NOT NULL,
    family TEXT NOT NULL,
    given TEXT NOT NULL,
    gender TEXT NOT NULL,
    birth_date TEXT NOT NULL,
    PRIMARY KEY (ins, authority)
);
CREATE TABLE IF NOT EXISTS submission_sets (
    entry_uuid TEXT PRIMARY KEY,
    unique_id TEXT NOT NULL UNIQUE,
    patient_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    submission_time TEXT NOT NULL,
    metadata BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    unique_id TEXT PRIMARY KEY,
    repository_unique_id TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    entry_uuid TEXT PRIMARY KEY,
    logical_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    unique_id TEXT NOT NULL REFERENCES documents (unique_id),
    patient_id TEXT NOT NULL,
    status TEXT NOT NULL,
    type_code TEXT NOT NULL,
    class_code TEXT NOT NULL,
    format_code TEXT NOT NULL,
    creation_time TEXT NOT NULL,
    service_start_time TEXT,
    confidentiality TEXT NOT NULL,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mime_type TEXT NOT NULL,
    submission_set TEXT NOT NULL REFERENCES submission_sets (entry_uuid),
    metadata BLOB NOT NULL,
    UNIQUE (logical_id, version)
);
CREATE INDEX IF NOT EXISTS entries_patient ON entries (patient_id, status);
CREATE INDEX IF NOT EXISTS entries_unique_id ON entries (unique_id);
CREATE TABLE IF NOT EXISTS associations (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    submission_set TEXT NOT NULL REFERENCES submission_sets (entry_uuid),
    metadata BLOB NOT NULL
);
"""


class StoreRefusal(Exception):
    """
    The store refused a change; C{code} is the XDS error code to answer
    with and C{location} the object concerned.
    """

    def __init__(self, code: str, message: str, location: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.location = location


@dataclass
class NewDocument:
    """
    A document of a submission, checked by the service: its entry, the
    entry's ebRIM XML as submitted, and the exact bytes.
    """

    entry: DocumentEntry
    metadata: bytes
    content: bytes
    hash: str
    size: int


@dataclass
class NewSubmission:
    """
    A whole TD2.1: the submission set, its documents and associations.
    """

    submission_set: SubmissionSet
    metadata: bytes
    documents: list[NewDocument]
    associations: list[tuple[Association, bytes]] = field(default_factory=list)


@dataclass
class StatusChange:
    """
    One UpdateAvailabilityStatus of a TD3.3.
    """

    entry_uuid: str
    original: str
    new: str


@dataclass
class NewVersion:
    """
    A new metadata version of a document of a TD3.3 (masking, unmasking).
    """

    entry: DocumentEntry
    metadata: bytes
    previous_version: str


@dataclass
class Update:
    """
    A whole TD3.3: its submission set, status changes and new versions.
    """

    submission_set: SubmissionSet
    metadata: bytes
    status_changes: list[StatusChange]
    versions: list[NewVersion]
    associations: list[tuple[Association, bytes]] = field(default_factory=list)


@dataclass
class StoredEntry:
    """
    A document entry as stored: the submitted XML and the registry's own
    attributes (status, version, logical id, hash and size).
    """

    entry_uuid: str
    logical_id: str
    version: int
    unique_id: str
    status: str
    hash: str
    size: int
    metadata: bytes


@dataclass
class FindFilter:
    """
    The FindDocuments parameters the store applies.
    """

    patient: PatientId
    statuses: Sequence[str]
    creation_from: str | None = None
    creation_to: str | None = None
    service_start_from: str | None = None
    service_start_to: str | None = None
    type_codes: Sequence[str] = ()
    class_codes: Sequence[str] = ()
    format_codes: Sequence[str] = ()
    confidentiality_codes: Sequence[str] = ()


def coded(code: str, scheme: str) -> str:
    """
    @return: a code as stored and as stored queries name it (C{code^^scheme}).
    """
    return f"{code}^^{scheme}"


def _time_bound(value: str) -> str:
    # XDS times have a variable precision: compare them to the second.
    return value.ljust(14, "0")


def _stored(row: Sequence[Any]) -> StoredEntry:
    return StoredEntry(
        row[0], row[1], int(row[2]), row[3], row[4], row[5], int(row[6]), bytes(row[7])
    )


def _refusing_conflicts(work: Callable[..., None]) -> Callable[..., None]:
    """
    @return: C{work}, with a clash with an identifier already stored turned
        into a L{StoreRefusal} (the transaction is rolled back either way).
    """

    def guarded(*arguments: object) -> None:
        try:
            work(*arguments)
        except sqlite3.IntegrityError as error:
            raise StoreRefusal(
                "XDSRegistryError",
                f"an identifier of the request is already used ({error})",
            ) from None

    return guarded


def _refuse_unless_current(entry: StoredEntry) -> None:
    """
    @raise StoreRefusal: C{entry} is deleted or was replaced: neither its
        status nor its metadata change any more.
    """
    if entry.status not in (Status.Approved, Status.Archived):
        state = "deleted" if entry.status == Status.Deleted else "replaced"
        raise StoreRefusal(
            "XDSMetadataUpdateError",
            f"document {entry.unique_id} is {state}: it no longer changes",
            entry.entry_uuid,
        )


class Store:
    """
    The sandbox's SQLite database, used from the reactor through Deferreds.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=self._configure,
        )

    @staticmethod
    def _configure(connection: sqlite3.Connection) -> None:
        connection.execute("PRAGMA foreign_keys = ON")

    def open(self) -> Deferred[None]:
        """
        Create the tables when missing and seed the test patients.

        @return: a Deferred that fires when the database is ready.
        """
        return self._run(self._create)

    def _create(self, cursor: adbapi.Transaction) -> None:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                cursor.execute(statement)
        cursor.executemany(
            "INSERT OR IGNORE INTO patients VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    p.patient.ins,
                    p.patient.authority,
                    p.family,
                    p.given,
                    p.gender,
                    p.birth_date,
                )
                for p in TEST_PATIENTS
            ],
        )

    def _run(self, work: Callable[..., T], *arguments: object) -> Deferred[T]:
        result: Deferred[T] = self._pool.runInteraction(work, *arguments)
        return result

    def close(self) -> None:
        """
        Stop the database thread and close the connection.
        """
        self._pool.close()

    # Patients ---------------------------------------------------------------
    def patient(self, patient: PatientId) -> Deferred[DmpRecord | None]:
        """
        @return: a Deferred that fires with the patient's DMP, or C{None}
            when this patient has none.
        """

        def find(cursor: adbapi.Transaction) -> DmpRecord | None:
            cursor.execute(
                "SELECT family, given, gender, birth_date FROM patients "
                "WHERE ins = ? AND authority = ?",
                (patient.ins, patient.authority),
            )
            row = cursor.fetchone()
            return DmpRecord(patient, *row) if row else None

        return self._run(find)

    # TD2.1 ------------------------------------------------------------------
    def submit(self, submission: NewSubmission) -> Deferred[None]:
        """
        Store a whole submission in one transaction.

        @return: a Deferred that fires when it is committed, or fails with
            L{StoreRefusal} (a uniqueId already known, an unknown replaced
            document) with nothing stored.
        """
        return self._run(_refusing_conflicts(self._submit), submission)

    def _submit(self, cursor: adbapi.Transaction, submission: NewSubmission) -> None:
        self._insert_set(cursor, submission.submission_set, submission.metadata)
        for document in submission.documents:
            entry = document.entry
            cursor.execute(
                "SELECT 1 FROM documents WHERE unique_id = ?", (entry.uniqueId,)
            )
            if cursor.fetchone():
                raise StoreRefusal(
                    "XDSDuplicateUniqueIdInRegistry",
                    f"a document with uniqueId {entry.uniqueId} is already stored",
                    entry.uniqueId,
                )
            cursor.execute(
                "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?)",
                (
                    entry.uniqueId,
                    DMP_REPOSITORY_ID,
                    entry.mimeType,
                    document.hash,
                    document.size,
                    sqlite3.Binary(document.content),
                ),
            )
            self._insert_entry(
                cursor,
                entry,
                document.metadata,
                entry.entryUUID,
                1,
                Status.Approved,
                document.hash,
                document.size,
                submission.submission_set.entryUUID,
            )
        for association, _ in submission.associations:
            if association.associationType.endswith(":RPLC"):
                self._replace(cursor, association.targetObject)
        self._insert_associations(
            cursor, submission.associations, submission.submission_set.entryUUID
        )

    def _replace(self, cursor: adbapi.Transaction, target: str) -> None:
        cursor.execute(
            "UPDATE entries SET status = ? WHERE entry_uuid = ? AND status = ?",
            (Status.Deprecated, target, Status.Approved),
        )
        if cursor.rowcount != 1:
            raise StoreRefusal(
                "UnresolvedReferenceException",
                f"the replaced document {target} is not an approved document",
                target,
            )

    def _insert_set(
        self, cursor: adbapi.Transaction, submission_set: SubmissionSet, xml: bytes
    ) -> None:
        cursor.execute(
            "SELECT 1 FROM submission_sets WHERE unique_id = ? OR entry_uuid = ?",
            (submission_set.uniqueId, submission_set.entryUUID),
        )
        if cursor.fetchone():
            raise StoreRefusal(
                "XDSDuplicateUniqueIdInRegistry",
                f"the submission set {submission_set.uniqueId} was already received",
                submission_set.uniqueId,
            )
        cursor.execute(
            "INSERT INTO submission_sets VALUES (?, ?, ?, ?, ?, ?)",
            (
                submission_set.entryUUID,
                submission_set.uniqueId,
                str(submission_set.patientId),
                submission_set.sourceId,
                submission_set.submissionTime,
                sqlite3.Binary(xml),
            ),
        )

    def _insert_entry(
        self,
        cursor: adbapi.Transaction,
        entry: DocumentEntry,
        metadata: bytes,
        logical_id: str,
        version: int,
        status: str,
        digest: str,
        size: int,
        submission_set: str,
    ) -> None:
        cursor.execute("SELECT 1 FROM entries WHERE entry_uuid = ?", (entry.entryUUID,))
        if cursor.fetchone():
            raise StoreRefusal(
                "XDSRegistryDuplicateUniqueIdInMessage",
                f"the entryUUID {entry.entryUUID} is already used",
                entry.entryUUID,
            )
        cursor.execute(
            "INSERT INTO entries VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.entryUUID,
                logical_id,
                version,
                entry.uniqueId,
                str(entry.patientId),
                status,
                coded(entry.typeCode.code, entry.typeCode.scheme),
                coded(entry.classCode.code, entry.classCode.scheme),
                coded(entry.formatCode.code, entry.formatCode.scheme),
                entry.creationTime,
                entry.serviceStartTime,
                " ".join(coded(c.code, c.scheme) for c in entry.confidentialityCode),
                digest,
                size,
                entry.mimeType,
                submission_set,
                sqlite3.Binary(metadata),
            ),
        )

    def _insert_associations(
        self,
        cursor: adbapi.Transaction,
        associations: Sequence[tuple[Association, bytes]],
        submission_set: str,
    ) -> None:
        cursor.executemany(
            "INSERT INTO associations VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    a.id,
                    a.associationType,
                    a.sourceObject,
                    a.targetObject,
                    submission_set,
                    sqlite3.Binary(xml),
                )
                for a, xml in associations
            ],
        )

    # TD3.3 ------------------------------------------------------------------
    def update(self, update: Update) -> Deferred[None]:
        """
        Apply a whole TD3.3 in one transaction.

        @return: a Deferred that fires when it is committed, or fails with
            L{StoreRefusal} (unknown document, deleted or replaced one, status
            or version that is not the current one) with nothing changed.
        """
        return self._run(_refusing_conflicts(self._update), update)

    def _update(self, cursor: adbapi.Transaction, update: Update) -> None:
        self._insert_set(cursor, update.submission_set, update.metadata)
        patient = str(update.submission_set.patientId)
        for change in update.status_changes:
            current = self._entry(cursor, "entry_uuid", change.entry_uuid)
            # Another patient's document is answered as an unknown one.
            if current is None or not self._of_patient(
                cursor, current.entry_uuid, patient
            ):
                raise StoreRefusal(
                    "UnresolvedReferenceException",
                    f"no document entry {change.entry_uuid}",
                    change.entry_uuid,
                )
            _refuse_unless_current(current)
            if current.status != change.original:
                raise StoreRefusal(
                    "XDSMetadataUpdateError",
                    f"document entry {change.entry_uuid} has status "
                    f"{current.status}, not {change.original}",
                    change.entry_uuid,
                )
            cursor.execute(
                "UPDATE entries SET status = ? WHERE entry_uuid = ?",
                (change.new, change.entry_uuid),
            )
        for version in update.versions:
            entry = version.entry
            logical_id = entry.logicalId or ""
            cursor.execute(
                "SELECT entry_uuid FROM entries WHERE logical_id = ? "
                "ORDER BY version DESC LIMIT 1",
                (logical_id,),
            )
            row = cursor.fetchone()
            current = self._entry(cursor, "entry_uuid", row[0]) if row else None
            if current is None or not self._of_patient(
                cursor, current.entry_uuid, patient
            ):
                raise StoreRefusal(
                    "UnresolvedReferenceException",
                    f"no document entry with logical id {logical_id}",
                    logical_id,
                )
            _refuse_unless_current(current)
            if str(current.version) != version.previous_version:
                raise StoreRefusal(
                    "XDSMetadataVersionError",
                    f"document {current.unique_id} is at version {current.version}, "
                    f"not {version.previous_version}",
                    logical_id,
                )
            if entry.uniqueId != current.unique_id:
                raise StoreRefusal(
                    "XDSMetadataUpdateError",
                    f"a new version of {current.unique_id} cannot change its "
                    f"uniqueId to {entry.uniqueId}",
                    logical_id,
                )
            cursor.execute(
                "UPDATE entries SET status = ? WHERE entry_uuid = ?",
                (Status.Deprecated, current.entry_uuid),
            )
            self._insert_entry(
                cursor,
                entry,
                version.metadata,
                logical_id,
                current.version + 1,
                current.status,
                current.hash,
                current.size,
                update.submission_set.entryUUID,
            )
        self._insert_associations(
            cursor, update.associations, update.submission_set.entryUUID
        )

    # TD3.1 ------------------------------------------------------------------
    _COLUMNS = (
        "entry_uuid, logical_id, version, unique_id, status, hash, size, metadata"
    )

    def _entry(
        self, cursor: adbapi.Transaction, column: str, value: str
    ) -> StoredEntry | None:
        cursor.execute(
            f"SELECT {self._COLUMNS} FROM entries WHERE {column} = ?", (value,)
        )
        row = cursor.fetchone()
        return _stored(row) if row else None

    @staticmethod
    def _of_patient(cursor: adbapi.Transaction, entry_uuid: str, patient: str) -> bool:
        cursor.execute(
            "SELECT 1 FROM entries WHERE entry_uuid = ? AND patient_id = ?",
            (entry_uuid, patient),
        )
        return cursor.fetchone() is not None

    def find(self, query: FindFilter) -> Deferred[list[StoredEntry]]:
        """
        @return: a Deferred that fires with the entries that match a
            FindDocuments, oldest first.
        """

        def find(cursor: adbapi.Transaction) -> list[StoredEntry]:
            where = ["patient_id = ?"]
            values: list[object] = [str(query.patient)]

            def any_of(column: str, wanted: Sequence[str]) -> None:
                if wanted:
                    where.append(f"{column} IN ({','.join('?' * len(wanted))})")
                    values.extend(wanted)

            any_of("status", query.statuses)
            any_of("type_code", query.type_codes)
            any_of("class_code", query.class_codes)
            any_of("format_code", query.format_codes)
            for column, low, high in [
                ("creation_time", query.creation_from, query.creation_to),
                (
                    "service_start_time",
                    query.service_start_from,
                    query.service_start_to,
                ),
            ]:
                if low is not None:
                    where.append(f"substr({column} || '00000000000000', 1, 14) >= ?")
                    values.append(_time_bound(low))
                if high is not None:
                    # IHE: the upper bound is exclusive.
                    where.append(f"substr({column} || '00000000000000', 1, 14) < ?")
                    values.append(_time_bound(high))
            cursor.execute(
                f"SELECT {self._COLUMNS}, confidentiality FROM entries "
                f"WHERE {' AND '.join(where)} ORDER BY rowid",
                values,
            )
            found = []
            for row in cursor.fetchall():
                codes = set(row[8].split())
                if query.confidentiality_codes and not codes & set(
                    query.confidentiality_codes
                ):
                    continue
                found.append(_stored(row))
            return found

        return self._run(find)

    def get(
        self,
        patient: PatientId,
        *,
        entry_uuids: Sequence[str] = (),
        unique_ids: Sequence[str] = (),
    ) -> Deferred[list[StoredEntry]]:
        """
        @return: a Deferred that fires with the entries named by entryUUID
            (whatever the case of its hexadecimal digits), and the current
            version of the documents named by uniqueId, of C{patient} only:
            another patient's are left out as unknown ones. An entry asked
            for twice is answered once.
        """

        def get(cursor: adbapi.Transaction) -> list[StoredEntry]:
            found: dict[str, StoredEntry] = {}
            for entry_uuid in entry_uuids:
                cursor.execute(
                    f"SELECT {self._COLUMNS} FROM entries WHERE entry_uuid = ? "
                    "COLLATE NOCASE AND patient_id = ?",
                    (entry_uuid, str(patient)),
                )
                row = cursor.fetchone()
                if row:
                    entry = _stored(row)
                    found.setdefault(entry.entry_uuid, entry)
            for unique_id in unique_ids:
                cursor.execute(
                    f"SELECT {self._COLUMNS} FROM entries WHERE unique_id = ? "
                    "AND patient_id = ? ORDER BY version DESC LIMIT 1",
                    (unique_id, str(patient)),
                )
                row = cursor.fetchone()
                if row:
                    entry = _stored(row)
                    found.setdefault(entry.entry_uuid, entry)
            return list(found.values())

        return self._run(get)

    # TD3.2 ------------------------------------------------------------------
    def document(
        self, unique_id: str, patient: PatientId
    ) -> Deferred[tuple[str, bytes] | None]:
        """
        @return: a Deferred that fires with the media type and exact bytes
            of a document of C{patient} that is not deleted, or C{None}
            (also for another patient's document).
        """

        def read(cursor: adbapi.Transaction) -> tuple[str, bytes] | None:
            cursor.execute(
                "SELECT d.mime_type, d.content FROM documents d WHERE d.unique_id = ? "
                "AND EXISTS (SELECT 1 FROM entries e WHERE e.unique_id = "
                "d.unique_id AND e.patient_id = ?) "
                "AND NOT EXISTS (SELECT 1 FROM entries e WHERE e.unique_id = "
                "d.unique_id AND e.status = ?)",
                (unique_id, str(patient), Status.Deleted),
            )
            row = cursor.fetchone()
            return (row[0], bytes(row[1])) if row else None

        return self._run(read)

    def count(self, table: str) -> Deferred[int]:
        """
        @return: a Deferred that fires with the number of rows of C{table}
            (C{documents}, C{entries}, C{submission_sets}, C{associations}).
        """
        if table not in {"documents", "entries", "submission_sets", "associations"}:
            raise ValueError(f"no table {table}")

        def count(cursor: adbapi.Transaction) -> int:
            cursor.execute(f"SELECT count(*) FROM {table}")
            return int(cursor.fetchone()[0])

        return self._run(count)


def serialize(element: etree._Element) -> bytes:
    """
    @return: an ebRIM object as stored: its XML, namespaces declared.
    """
    result: bytes = etree.tostring(element, encoding="UTF-8")
    return result
