"""
Where the public DMP material is looked for, and what is said when it is
not found: both places, and a CPSDMP_FIXTURES set to a wrong folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from cpsdmp._fixtures import fixtures_dir, fixtures_missing
from tests.conformance.material import material

REPOSITORY = Path(__file__).resolve().parents[1]
BESIDE = REPOSITORY.parent / "shared" / "fixtures"


class LookupTests(SynchronousTestCase):
    def set_variable(self, value: str | None) -> None:
        old = os.environ.get("CPSDMP_FIXTURES")

        def restore() -> None:
            os.environ.pop("CPSDMP_FIXTURES", None)
            if old is not None:
                os.environ["CPSDMP_FIXTURES"] = old

        self.addCleanup(restore)
        os.environ.pop("CPSDMP_FIXTURES", None)
        if value is not None:
            os.environ["CPSDMP_FIXTURES"] = value

    def test_variable_set_but_wrong(self) -> None:
        """
        A CPSDMP_FIXTURES naming no folder is said to be set and wrong, with
        the folder it names and the place used when it is unset.
        """
        self.set_variable("/nonexistent")
        self.assertIsNone(fixtures_dir())
        message = fixtures_missing()
        self.assertIn("CPSDMP_FIXTURES is set to /nonexistent, which is not a", message)
        self.assertIn(str(BESIDE), message)
        error = self.assertRaises(RuntimeError, material)
        self.assertIn("CPSDMP_FIXTURES is set to /nonexistent", str(error))
        self.assertNotIn("set CPSDMP_FIXTURES to its", str(error))

    def test_variable_unset(self) -> None:
        """
        Unset, the material is looked for beside the checkout, which the
        message names.
        """
        self.set_variable(None)
        message = fixtures_missing()
        self.assertIn("CPSDMP_FIXTURES is not set", message)
        self.assertIn(str(BESIDE), message)
        found = fixtures_dir()
        self.assertEqual(found, BESIDE if BESIDE.is_dir() else None)

    def test_variable_set(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        self.set_variable(str(folder))
        self.assertEqual(fixtures_dir(), folder)
