"""
Tests for C{cpsdmp metadata}: the command prints, for an ANS example CDA,
the metadata a submission would carry, under XDS attribute names.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.xds import cli
from tests.conformance.material import example_cdas

REPOSITORY = Path(__file__).resolve().parents[2]


def run(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="cpsdmp")
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["metadata", *argv])
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = args.func(args)
    return status, out.getvalue(), err.getvalue()


def example(name: str):
    return next(p for p in example_cdas() if p.name.startswith(name))


class MetadataCommandTests(SynchronousTestCase):
    def test_json(self) -> None:
        """
        C{--json} prints the DocumentEntry keyed by XDS names, with the hash
        and size of the file's bytes.
        """
        path = example("BIO-CR-BIO")
        status, out, _ = run(str(path), "--json")
        self.assertEqual(status, 0)
        values = json.loads(out)
        for key in [
            "patientId",
            "typeCode",
            "classCode",
            "creationTime",
            "title",
            "confidentialityCode",
            "formatCode",
            "authorPerson",
            "size",
            "hash",
        ]:
            self.assertIn(key, values)
        data = path.read_bytes()
        self.assertEqual(values["hash"], hashlib.sha1(data).hexdigest())
        self.assertEqual(values["size"], len(data))
        self.assertEqual(values["typeCode"]["code"], "11502-2")
        self.assertEqual(
            values["patientId"], "279035121518989^^^&1.2.250.1.213.1.4.10&ISO^NH"
        )

    def test_text(self) -> None:
        """
        Without C{--json}, one line per attribute, codes as CE.
        """
        status, out, _ = run(str(example("DOC_NON_STRUCTURE")))
        self.assertEqual(status, 0)
        self.assertIn(
            "formatCode: urn:ihe:iti:xds-sd:pdf:2008^Document PDF^"
            "1.3.6.1.4.1.19376.1.2.3\n",
            out,
        )

    def test_unknown_class_then_override(self) -> None:
        """
        A typeCode without classCode mapping fails with exit status 2 (the
        input does not do without an argument) and a message naming it;
        C{--class-code} fixes it.
        """
        path = str(example("DLU-EHPAD-FLUDR"))
        status, _, err = run(path)
        self.assertEqual(status, 2)
        self.assertIn("74207-2", err)
        self.assertIn("--class-code", err)
        status, out, _ = run(path, "--json", "--class-code", "11^Synthèse")
        self.assertEqual(status, 0)
        self.assertEqual(
            json.loads(out)["classCode"],
            {
                "code": "11",
                "codingScheme": "1.2.250.1.213.1.1.4.1",
                "display": "Synthèse",
            },
        )

    def test_override_title(self) -> None:
        """
        Options override what the CDA says.
        """
        status, out, _ = run(str(example("VAC-NOTE")), "--json", "--title", "Autre")
        self.assertEqual(json.loads(out)["title"], "Autre")

    def test_format_code_urn(self) -> None:
        """
        A formatCode is a URN (IHE TRE_A11, CI-SIS TRE_A06): one given with
        its colons is taken as it is.
        """
        status, out, err = run(
            str(example("VAC-NOTE")),
            "--json",
            "--format-code",
            "urn:asip:ci-sis:vac:2019^Carnet de vaccination^1.2.250.1.213.1.1.4.2.282",
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            json.loads(out)["formatCode"],
            {
                "code": "urn:asip:ci-sis:vac:2019",
                "codingScheme": "1.2.250.1.213.1.1.4.2.282",
                "display": "Carnet de vaccination",
            },
        )

    def test_missing_file(self) -> None:
        """
        A missing file is exit status 2 with its name.
        """
        status, _, err = run("/nonexistent/cda.xml")
        self.assertEqual(status, 2)
        self.assertIn("/nonexistent/cda.xml", err)

    def test_bad_input_files(self) -> None:
        """
        A file that is not a CDA the DMP would take, whatever the reason,
        is exit status 2 with one line naming it, as for cpsdmp submit.
        """
        data = example("VAC-NOTE").read_bytes()
        start = data.index(b"<confidentialityCode")
        end = data.index(b">", start) + 1
        for name, content, expected in [
            (
                "doctype.xml",
                b'<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY a "b">]>\n'
                b'<ClinicalDocument xmlns="urn:hl7-org:v3"/>\n',
                "a document type declaration (DOCTYPE) is not accepted",
            ),
            ("hello.xml", b"hello\n", "not well-formed XML"),
            ("html.xml", b"<html/>", "ClinicalDocument"),
            (
                "no-confidentiality.xml",
                data[:start] + data[end:],
                "confidentialityCode",
            ),
        ]:
            path = Path(self.mktemp() + name)
            path.write_bytes(content)
            status, out, err = run(str(path))
            self.assertEqual(status, 2, err)
            self.assertEqual(out, "")
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertTrue(err.startswith(f"cpsdmp metadata: {path}: "), err)
            self.assertIn(expected, err)

    def test_exit_status_as_a_process(self) -> None:
        """
        Run as a user runs them, cpsdmp metadata and cpsdmp submit exit
        with the same status for a CDA with a DOCTYPE.
        """
        path = Path(self.mktemp() + ".xml").absolute()
        path.write_bytes(
            b'<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY a "b">]>\n'
            b'<ClinicalDocument xmlns="urn:hl7-org:v3"/>\n'
        )
        context = Path(self.mktemp() + ".json").absolute()
        context.write_text(
            '{"url": "https://127.0.0.1:1", "token": "t", '
            '"tlsFingerprint": "sha256:00"}'
        )
        for argv in [
            ["metadata", str(path)],
            ["submit", str(path), "--agent-context", str(context)],
        ]:
            result = subprocess.run(
                [sys.executable, "-m", "cpsdmp.cli", *argv],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
            )
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertIn("DOCTYPE", result.stderr)

    def test_malformed_codes_refused(self) -> None:
        """
        A code that is not one, a coding scheme that is not an OID and an
        empty title are usage errors, not metadata.
        """
        path = str(example("VAC-NOTE"))
        for argv in [
            ["--class-code", "gar bage"],
            ["--class-code", "10^x^1.2.3x"],
            ["--class-code", ""],
            ["--format-code", "urn:x"],
            ["--title", " "],
        ]:
            err = io.StringIO()
            with redirect_stderr(err), self.assertRaises(SystemExit):
                run(path, *argv)
            self.assertIn("argument", err.getvalue())

    def test_class_code_of_the_table(self) -> None:
        """
        A TRE_A03 classCode the table has not is refused as a usage error
        that lists the table's codes (it printed ZZZ^^1.2.250.1.213.1.1.4.1).
        """
        path = str(example("DLU-EHPAD-FLUDR"))
        for given in ["ZZZ", "ZZZ^x^1.2.250.1.213.1.1.4.1", "12"]:
            err = io.StringIO()
            with redirect_stderr(err), self.assertRaises(SystemExit) as stopped:
                run(path, "--class-code", given)
            self.assertEqual(stopped.exception.code, 2)
            self.assertIn("is not a class of TRE_A03", err.getvalue())
            self.assertIn("11 (Synthèse)", err.getvalue())
        status, out, err = run(path, "--json", "--class-code", "11")
        self.assertEqual((status, err), (0, ""))

    def test_size_bound(self) -> None:
        """
        Reading stops at the bound, so a huge file is refused without being
        read whole.
        """
        huge = Path(self.mktemp())
        with huge.open("wb") as f:
            f.truncate(1024 * 1024 + 1)
        with self.assertRaises(ValueError) as raised:
            cli.read_cda(huge, limit=1024 * 1024)
        self.assertIn("larger than 1 MiB", str(raised.exception))
        small = Path(self.mktemp())
        small.write_bytes(b"<x/>")
        self.assertEqual(cli.read_cda(small, limit=4), b"<x/>")

    def test_not_a_regular_file(self) -> None:
        """
        A device, a folder or a pipe no one writes to is refused at once,
        without waiting for a writer.
        """
        fifo = Path(self.mktemp())
        os.mkfifo(fifo)
        for path in [Path("/dev/zero"), Path("."), fifo]:
            with self.assertRaises(ValueError) as raised:
                cli.read_cda(path)
            self.assertEqual(str(raised.exception), "not a regular file")
