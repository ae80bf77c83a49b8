"""
The facade under load, as processes: five professionals, each with a test
card issued under one test PKI and an agent of their own (SoftHSM2 reads its
configuration once per process), submit fifty documents at once through one
facade to one local DMP.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import (
    Deferred,
    ensureDeferred,
    gatherResults,
)
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cpsdmp.agent import pki
from cpsdmp.agent.client import open_session
from cpsdmp.agent.testcard import TestCard, init_testcard
from cpsdmp.demo import Demo
from cpsdmp.facade.client import FacadeClient
from cpsdmp.sandbox.store import TEST_PATIENTS
from cpsdmp.xds.sample import SamplePatient, sample_cda

PROFESSIONALS = 5
SUBMISSIONS = 50
CALL_TIMEOUT = 60.0


def _professional(number: int) -> pki.Professional:
    return pki.Professional(
        id=f"8100000{number:05d}",
        given_name=f"Praticien{number}",
        family_name="CHARGE-TEST",
        profession="Médecin",
        profession_code="10",
        specialty="G15_10/SM54",
        organization="CABINET CPSDMP TEST",
    )


def _patients() -> list[SamplePatient]:
    return [
        SamplePatient(r.patient.ins, r.family, r.given, r.gender, r.birth_date)
        for r in TEST_PATIENTS
    ]


def make_cards(directory: Path, count: int) -> list[TestCard]:
    """
    @return: C{count} SoftHSM2 test cards of different professionals, each in
        its own folder with its own token label, all issued by the first.
    """
    first = init_testcard(
        directory / "card-1",
        softhsm=True,
        token_label="CPS TEST 1",
        professional=_professional(1),
        keep_authority_keys=True,
    )
    return [first] + [
        init_testcard(
            directory / f"card-{n}",
            softhsm=True,
            token_label=f"CPS TEST {n}",
            professional=_professional(n),
            issuer=first,
        )
        for n in range(2, count + 1)
    ]


def _signed(audit_log: Path, key: str) -> int:
    records = [
        json.loads(line)
        for line in audit_log.read_text("utf-8").splitlines()
        if line.strip()
    ]
    return sum(
        1 for r in records if r.get("key") == key and r.get("outcome") == "signed"
    )


class LoadTests(TestCase):
    timeout = 150

    def test_concurrent_submissions(self) -> Deferred[None]:
        """
        Fifty submissions sent at once by five professionals all answer
        Success; each document is stored exactly once, found once by TD3.1
        and once, byte for byte, in the local DMP's database; each card made one
        authentication signature (its first handshake, the others resumed
        or reused) and one submission-set signature per submission.
        """
        return ensureDeferred(self._play())

    async def _play(self) -> None:
        directory = Path("load").absolute()
        cards = await deferToThread(make_cards, directory, PROFESSIONALS)
        chain = Demo(reactor, str(directory), keep=True)
        self.addCleanup(lambda: ensureDeferred(chain.stop_processes()))
        dmp_url = await chain.start_sandbox(cards[0])
        names = [f"agent-{n}" for n in range(1, PROFESSIONALS + 1)]
        agents = await gatherResults(
            [
                ensureDeferred(chain.start_agent(card, name))
                for card, name in zip(cards, names, strict=True)
            ],
            consumeErrors=True,
        )
        facade_url = await chain.start_facade(cards[0], dmp_url)
        contexts = await gatherResults(
            [
                open_session(url, card.pin, pinned, reactor, timeout=CALL_TIMEOUT)
                for card, (url, pinned) in zip(cards, agents, strict=True)
            ],
            consumeErrors=True,
        )
        facade = FacadeClient(facade_url, reactor, timeout=CALL_TIMEOUT)
        self.addCleanup(facade.close)

        patients = _patients()
        plan: list[tuple[int, SamplePatient, bytes]] = []
        for k in range(SUBMISSIONS):
            who = k % PROFESSIONALS
            patient = patients[(k // PROFESSIONALS) % len(patients)]
            document = sample_cda(
                cards[who].professional, patient, text=f"Document de charge {k}.\n"
            )
            plan.append((who, patient, document))
        answers: list[dict[str, Any]] = await gatherResults(
            [
                facade.td21_submit([document], contexts[who])
                for who, _, document in plan
            ],
            consumeErrors=True,
        )

        self.assertEqual([a["status"] for a in answers], ["Success"] * SUBMISSIONS)
        unique_ids = [a["documents"][0]["uniqueId"] for a in answers]
        self.assertEqual(len(set(unique_ids)), SUBMISSIONS)

        # TD3.1 by uniqueId, for each patient: every document found once.
        by_patient: dict[str, list[str]] = {}
        for (_, patient, _), unique_id in zip(plan, unique_ids, strict=True):
            by_patient.setdefault(patient.ins, []).append(unique_id)
        for ins, expected in by_patient.items():
            found = await facade.td31_find(
                contexts[0],
                {"ins": ins, "authority": TEST_PATIENTS[0].patient.authority},
                uniqueIds=expected,
            )
            self.assertEqual(sorted(d["uniqueId"] for d in found), sorted(expected))

        # The local DMP's own database: each CDA stored once, as sent, beside
        # its submission set's signature (IHE DSG), one set per submission.
        database = sqlite3.connect(directory / "dmp.sqlite", timeout=10)
        try:
            stored = list(database.execute("SELECT unique_id, content FROM documents"))
            entries = Counter(
                row[0] for row in database.execute("SELECT unique_id FROM entries")
            )
            (sets,) = database.execute(
                "SELECT COUNT(*) FROM submission_sets"
            ).fetchone()
        finally:
            database.close()
        sent = {
            u: document for (_, _, document), u in zip(plan, unique_ids, strict=True)
        }
        cdas = Counter(u for u, _ in stored if u in sent)
        self.assertEqual(cdas, Counter(unique_ids))
        self.assertEqual({u: bytes(c) for u, c in stored if u in sent}, sent)
        self.assertEqual(len(stored), 2 * SUBMISSIONS)
        self.assertEqual(sum(entries[u] for u in sent), SUBMISSIONS)
        self.assertEqual(sum(entries.values()), 2 * SUBMISSIONS)
        self.assertEqual(sets, SUBMISSIONS)

        for name in names:
            audit_log = chain.audit_log(name)
            self.assertEqual(_signed(audit_log, "authentication"), 1, name)
            self.assertEqual(
                _signed(audit_log, "signature"), SUBMISSIONS // PROFESSIONALS, name
            )
