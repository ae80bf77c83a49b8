"""
Reading requests as the DMP would: the official example requests read
through L{cpsdmp.xds.requests}, and what our builders make reads back to
what was put in.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.soap import read_message
from cpsdmp.xds.ebrim import (
    LCM,
    AssociationType,
    MetadataError,
    PatientId,
    Status,
)
from cpsdmp.xds.requests import (
    read_adhoc_query,
    read_existence_request,
    read_provide_and_register,
    read_retrieve_request,
    read_submit_objects,
)
from cpsdmp.xds.transactions import (
    FIND_DOCUMENTS,
    FindDocuments,
    existence_test,
    find_documents,
    new_submission,
    provide_and_register,
    retrieve_documents,
)
from tests.conformance.test_transactions import (
    ENDPOINTS,
    VIHF,
    cda_entries,
    example,
    round_trip,
)
from tests.xdsvalues import DEFAULTS, PATIENT, PROFESSIONAL, SOFTWARE, STRUCTURE


class OfficialRequestTests(SynchronousTestCase):
    def test_td02(self) -> None:
        """
        The official TD0.2 asks about the test INS 207058575627097.
        """
        patient = read_existence_request(example("td0.2_request.xml").body)
        self.assertEqual(patient, PatientId("207058575627097", "1.2.250.1.213.1.4.10"))

    def test_td31(self) -> None:
        """
        The official TD3.1 is a FindDocuments for approved documents.
        """
        query = read_adhoc_query(example("td3.1_request.xml").body)
        self.assertEqual(query.query_id, FIND_DOCUMENTS)
        self.assertEqual(query.return_type, "LeafClass")
        self.assertEqual(
            query.values("$XDSDocumentEntryPatientId"),
            ["207058575627097^^^&1.2.250.1.213.1.4.10&ISO^NH"],
        )
        self.assertEqual(query.values("$XDSDocumentEntryStatus"), [Status.Approved])

    def test_td32(self) -> None:
        """
        The official TD3.2 asks for one document of the DMP's repository.
        """
        self.assertEqual(
            read_retrieve_request(example("td3.2_request.xml").body),
            [("1.2.250.1.213.4.1.1.1.2", "1.2.250.1.999.1.1.7898.1.995657292")],
        )

    def test_td33(self) -> None:
        """
        The official TD3.3c and TD3.3d read as status updates of one entry.
        """
        for name, old, new in [
            ("td3.3c_request.xml", Status.Archived, Status.Deleted),
            ("td3.3d_request.xml", Status.Approved, Status.Archived),
        ]:
            submitted = read_submit_objects(example(name).body)
            self.assertEqual(
                submitted.submission_set.patientId,
                PatientId("207058575627097", "1.2.250.1.213.1.4.10"),
            )
            self.assertEqual(
                submitted.submission_set.authors[0].person.identifier, "899900063480"
            )
            (association,) = submitted.associations
            self.assertEqual(
                association.associationType, AssociationType.UpdateAvailabilityStatus
            )
            self.assertEqual(association.slot("OriginalStatus"), old)
            self.assertEqual(association.slot("NewStatus"), new)
            self.assertEqual(
                association.targetObject,
                "urn:uuid:fe5287a2-ae6a-11eb-8f5d-0050569e422e",
            )


class RoundTripTests(SynchronousTestCase):
    def test_td21(self) -> None:
        """
        A TD2.1 reads back to its submission set, entries, associations and
        exact documents.
        """
        entries = cda_entries()
        submission = new_submission(
            entries, PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
        )
        message = provide_and_register(ENDPOINTS, VIHF, submission)
        submitted, documents = read_provide_and_register(
            read_message(message.content_type, message.body())
        )
        self.assertEqual(
            submitted.submission_set.uniqueId, submission.submission_set.uniqueId
        )
        self.assertEqual(
            [e.as_dict() for e in submitted.entries],
            [e.as_dict() for e, _ in entries],
        )
        for entry, data in entries:
            self.assertEqual(bytes(documents[entry.entryUUID]), data)
        self.assertEqual(len(submitted.associations), len(entries))

    def test_td21_mismatch(self) -> None:
        """
        A document without entry is refused.
        """
        entries = cda_entries()[:1]
        submission = new_submission(
            entries, PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
        )
        message = provide_and_register(ENDPOINTS, VIHF, submission)
        response = read_message(message.content_type, message.body())
        objects = response.body.find(f"{{{LCM}}}SubmitObjectsRequest")[0]
        objects.remove(objects[1])
        self.assertRaises(MetadataError, read_provide_and_register, response)

    def test_queries_and_others(self) -> None:
        """
        FindDocuments, retrieve and existence requests read back to their
        parameters.
        """
        query = read_adhoc_query(
            round_trip(
                find_documents(
                    ENDPOINTS,
                    VIHF,
                    FindDocuments(PATIENT, statuses=(Status.Approved, Status.Archived)),
                )
            ).body
        )
        self.assertEqual(
            query.values("$XDSDocumentEntryStatus"), [Status.Approved, Status.Archived]
        )
        self.assertEqual(query.values("$XDSDocumentEntryPatientId"), [str(PATIENT)])
        self.assertEqual(
            read_retrieve_request(
                round_trip(retrieve_documents(ENDPOINTS, VIHF, ["1.2.3", "4.5"])).body
            ),
            [("1.2.250.1.213.4.1.1.1.2", "1.2.3"), ("1.2.250.1.213.4.1.1.1.2", "4.5")],
        )
        self.assertEqual(
            read_existence_request(
                round_trip(existence_test(ENDPOINTS, VIHF, PATIENT)).body
            ),
            PATIENT,
        )
