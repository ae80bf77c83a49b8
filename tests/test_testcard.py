"""
Tests for the test PKI and the test CPS card: what a real card holds, where
the real card holds it, and nothing written outside the card's folder.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.verification import PolicyBuilder, Store
from twisted.trial.unittest import TestCase

from cpsdmp.agent import testcard
from cpsdmp.agent.pki import verify_card_chain
from cpsdmp.agent.testcard import TestCard, init_testcard

# Read when trial imports the tests, before any card is made or loaded.
_INHERITED_SOFTHSM2_CONF = os.environ.get("SOFTHSM2_CONF")


@functools.cache
def _token_card() -> TestCard:
    return init_testcard(Path("testcard-token").absolute(), softhsm=True)


@functools.cache
def _soft_card() -> TestCard:
    return init_testcard(Path("testcard-soft").absolute(), softhsm=False)


def _objects(card: TestCard) -> str:
    """
    List the token's objects with OpenSC, as a person checking a card would.
    """
    assert card.pkcs11_module and card.token_label
    return subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            card.pkcs11_module,
            "--token-label",
            card.token_label,
            "--login",
            "--pin",
            card.pin,
            "--list-objects",
        ],
        env={**os.environ, **card.environment()},
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode("utf-8", "replace")


def _blocks(listing: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    for line in listing.splitlines():
        if line.endswith("Object; RSA 2048 bits") or " Object;" in line:
            blocks.append({"kind": line.split(" Object;")[0]})
        elif blocks and ":" in line:
            key, _, value = line.strip().partition(":")
            blocks[-1][key.strip()] = value.strip()
    return blocks


class TokenTestCardTests(TestCase):
    """
    A SoftHSM2 test card, made once for these tests.
    """

    def setUp(self) -> None:
        self.card = _token_card()
        self.directory = Path(self.card.directory)

    def test_description(self) -> None:
        """
        testcard.json names every part with absolute paths that exist.
        """
        description = json.loads((self.directory / "testcard.json").read_text())
        for key in [
            "pin",
            "pkcs11_module",
            "token_label",
            "softhsm2_conf",
            "soft_card",
            "ca_root",
            "ca_intermediates",
            "sandbox_cert",
            "sandbox_key",
            "professional",
        ]:
            self.assertIn(key, description)
        for key in [
            "soft_card",
            "ca_root",
            "sandbox_cert",
            "sandbox_key",
            "softhsm2_conf",
        ]:
            self.assertTrue(Path(description[key]).is_absolute())
            self.assertTrue(Path(description[key]).exists(), key)
        self.assertEqual(
            set(description["professional"]) >= {"id", "name", "profession"}, True
        )
        self.assertEqual(TestCard.load(self.directory), self.card)

    def test_objects_like_a_real_card(self) -> None:
        """
        The token holds the real card's key and certificate labels, each key
        linked to its certificate by CKA_ID, and the authentication key
        accepts CKM_RSA_PKCS alone.
        """
        blocks = _blocks(_objects(self.card))
        by_label = {(b["kind"], b.get("label")): b for b in blocks}
        auth_key = by_label[("Private Key", "CPS_PRIV_AUT")]
        sig_key = by_label[("Private Key", "CPS_PRIV_SIG")]
        auth_cert = by_label[("Certificate", "Certificat d'Authentification CPS")]
        sig_cert = by_label[("Certificate", "Certificat de Signature CPS")]
        self.assertEqual(auth_key["ID"], auth_cert["ID"])
        self.assertEqual(sig_key["ID"], sig_cert["ID"])
        self.assertNotEqual(auth_key["ID"], sig_key["ID"])
        self.assertEqual(auth_key["Allowed mechanisms"], "RSA-PKCS")
        self.assertIn("never extractable", auth_key["Access"])
        self.assertIn("never extractable", sig_key["Access"])

    def test_authentication_key_refuses_other_mechanisms(self) -> None:
        """
        SoftHSM2 enforces the restriction: SHA256-RSA-PKCS on the
        authentication key fails, as on a CPS3 card.
        """
        data = self.directory / "refused-input"
        data.write_bytes(b"some handshake bytes")
        result = subprocess.run(
            [
                "pkcs11-tool",
                "--module",
                self.card.pkcs11_module or "",
                "--token-label",
                self.card.token_label or "",
                "--login",
                "--pin",
                self.card.pin,
                "--sign",
                "--mechanism",
                "SHA256-RSA-PKCS",
                "--id",
                testcard.AUTHENTICATION_ID,
                "--input-file",
                str(data),
            ],
            env={**os.environ, **self.card.environment()},
            capture_output=True,
            timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"CKR_MECHANISM_INVALID", result.stderr)

    def test_idempotent(self) -> None:
        """
        A second initialisation reuses the card: same root, same token.
        """
        root = Path(self.card.ca_root).read_bytes()
        listing = _objects(self.card)
        again = init_testcard(self.directory)
        self.assertEqual(again, self.card)
        self.assertEqual(Path(again.ca_root).read_bytes(), root)
        self.assertEqual(_objects(again), listing)

    def test_softhsm_configuration_is_its_own(self) -> None:
        """
        The token lives in the card's folder, through its own configuration,
        and the test process's SOFTHSM2_CONF is what it inherited (the card
        sets its own only for the time the module is loaded).
        """
        conf = Path(self.card.softhsm2_conf or "").read_text()
        self.assertIn(f"directories.tokendir = {self.directory / 'tokens'}", conf)
        self.assertEqual(os.environ.get("SOFTHSM2_CONF"), _INHERITED_SOFTHSM2_CONF)


class PkiTests(TestCase):
    """
    The test hierarchy validates the way the DMP and its clients validate.
    """

    def setUp(self) -> None:
        self.card = _soft_card()

    def _store(self) -> Store:
        return Store([self.card.ca_root_certificate()])

    def test_sandbox_certificate_for_loopback(self) -> None:
        """
        The local DMP's certificate validates for localhost and 127.0.0.1.
        """
        chain = x509.load_pem_x509_certificates(
            Path(self.card.sandbox_cert).read_bytes()
        )
        for name in [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]:
            verifier = PolicyBuilder().store(self._store()).build_server_verifier(name)
            verified = verifier.verify(chain[0], chain[1:])
            self.assertEqual(verified[-1], self.card.ca_root_certificate())
        wrong = (
            PolicyBuilder()
            .store(self._store())
            .build_server_verifier(x509.DNSName("lps2.dmp.gouv.fr"))
        )
        with self.assertRaises(x509.verification.VerificationError):
            wrong.verify(chain[0], chain[1:])

    def test_soft_card(self) -> None:
        """
        The soft card opens with the PIN only; its authentication certificate
        is a client certificate of the persons CA naming the professional.
        """
        data = Path(self.card.soft_card).read_bytes()
        with self.assertRaises(ValueError):
            pkcs12.load_pkcs12(data, b"0000")
        loaded = pkcs12.load_pkcs12(data, self.card.pin.encode())
        assert loaded.cert is not None
        leaf = loaded.cert.certificate
        intermediates = [c.certificate for c in loaded.additional_certs]
        path = verify_card_chain(
            [leaf, *intermediates], [self.card.ca_root_certificate()]
        )
        self.assertEqual(
            path[1].subject.rfc4514_string(),
            "CN=TEST AC IGC-SANTE ELEMENTAIRE PERSONNES,OU=IGC-SANTE TEST,"
            "O=ASIP-SANTE,C=FR",
        )
        common_name = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        self.assertEqual(
            common_name[0].value,
            f"{self.card.professional['id']}/{self.card.professional['name']}",
        )
        title = leaf.subject.get_attributes_for_oid(x509.NameOID.TITLE)
        self.assertEqual(title[0].value, self.card.professional["profession"])
        self.assertGreater(
            leaf.not_valid_after_utc,
            datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365),
        )

    def test_soft_only_card_has_no_token(self) -> None:
        self.assertFalse(self.card.has_token)
        self.assertIsNone(self.card.softhsm2_conf)
        self.assertFalse(Path(self.card.directory, "tokens").exists())


def _source_root() -> str:
    import cpsdmp

    return str(Path(cpsdmp.__file__).parent.parent)


class CommandTests(TestCase):
    def test_init_command(self) -> None:
        """
        `cpsdmp testcard init --dir DIR` makes the card and says where.
        """
        directory = Path("testcard-cli").absolute()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "cpsdmp.cli",
                "testcard",
                "init",
                "--dir",
                str(directory),
            ],
            capture_output=True,
            timeout=120,
            text=True,
            env={**os.environ, "PYTHONPATH": _source_root()},
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(str(directory / "testcard.json"), result.stdout)
        self.assertTrue(TestCard.load(directory).is_complete())

    def _init(self, *argv: str, **options: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cpsdmp.cli", "testcard", "init", *argv],
            stderr=subprocess.PIPE,
            timeout=120,
            text=True,
            env={**os.environ, "PYTHONPATH": _source_root()},
            **options,
        )

    def test_output_closed(self) -> None:
        """
        Output to a pipe its reader closed (`| head -1`): no traceback, exit
        status 1.
        """
        directory = Path("testcard-pipe").absolute()
        init_testcard(directory, softhsm=False)
        read, write = os.pipe()
        os.close(read)
        try:
            result = self._init("--dir", str(directory), "--soft-only", stdout=write)
        finally:
            os.close(write)
        self.assertEqual(result.stderr, "")
        self.assertEqual(result.returncode, 1)

    def test_dir_not_a_folder(self) -> None:
        """
        A --dir that names a file, or a path through one: one line that says
        so, exit status 2.
        """
        file = Path("a-file").absolute()
        file.write_text("not a folder\n")
        for directory, expected in [
            (file, f"cannot use {file} for a test card: it is not a folder"),
            (file / "x", f"cannot use {file / 'x'} for a test card: Not a directory"),
        ]:
            result = self._init("--dir", str(directory), stdout=subprocess.DEVNULL)
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertEqual(result.stderr, f"cpsdmp testcard: {expected}\n")

    def test_folder_not_named(self) -> None:
        """
        `--dir ''` is a usage error: one line, exit status 2.
        """
        result = self._init("--dir", "", stdout=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(
            result.stderr,
            "cpsdmp testcard: the test card's folder is empty: name a folder\n",
        )

    def test_foreign_folder_untouched(self) -> None:
        """
        A --dir that holds files but no test card is refused in one line,
        exit status 2, and nothing in it is removed, rewritten or added; an
        empty folder that exists is used.
        """
        directory = Path("someone-elses").absolute()
        (directory / "tokens").mkdir(parents=True)
        (directory / "tokens" / "important.txt").write_text("x\n")
        (directory / "ca-root.pem").write_text("mine\n")
        result = self._init("--dir", str(directory), stdout=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(
            result.stderr,
            f"cpsdmp testcard: cannot use {directory} for a test card: it holds "
            "files but no test card (testcard.json); name an empty or new folder\n",
        )
        self.assertEqual(
            sorted(str(p.relative_to(directory)) for p in directory.rglob("*")),
            ["ca-root.pem", "tokens", "tokens/important.txt"],
        )
        self.assertEqual((directory / "ca-root.pem").read_text(), "mine\n")
        self.assertEqual((directory / "tokens" / "important.txt").read_text(), "x\n")

        empty = Path("empty-folder").absolute()
        empty.mkdir()
        result = self._init(
            "--dir", str(empty), "--soft-only", stdout=subprocess.DEVNULL
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(TestCard.load(empty).is_complete())

    def test_nothing_written_outside(self) -> None:
        """
        `cpsdmp testcard init --dir DIR`, run twice with a SoftHSM2 token,
        writes only in DIR: not in its working folder, HOME, TMPDIR, nor the
        token folder of a SOFTHSM2_CONF it inherits or of the system's
        SoftHSM2; the second run rewrites none of its files.
        """
        base = Path("outside").absolute()
        home, temporary, working, decoy = (
            base / name for name in ("home", "tmp", "cwd", "decoy-tokens")
        )
        for folder in (home, temporary, working, decoy):
            folder.mkdir(parents=True)
        decoy_conf = base / "decoy-softhsm2.conf"
        decoy_conf.write_text(f"directories.tokendir = {decoy}\n")
        system_tokens = Path("/var/lib/softhsm/tokens")

        def system_state() -> list[tuple[str, float]]:
            try:
                return sorted(
                    (str(p), p.stat().st_mtime) for p in system_tokens.rglob("*")
                )
            except OSError:
                return []

        def state(folder: Path) -> dict[str, tuple[int, float]]:
            # SoftHSM2 rewrites its own token files at each login (the
            # reuse check logs in to list the objects): their size only.
            return {
                str(p.relative_to(folder)): (
                    p.stat().st_size,
                    0.0 if p.is_relative_to(folder / "tokens") else p.stat().st_mtime,
                )
                for p in folder.rglob("*")
                if p.name != ".testcard.lock"
            }

        directory = base / "card"
        environment = {
            **os.environ,
            "PYTHONPATH": _source_root(),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": str(home),
            "TMPDIR": str(temporary),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "SOFTHSM2_CONF": str(decoy_conf),
        }
        before = system_state()
        states = []
        for _ in range(2):
            result = subprocess.run(
                [sys.executable, "-m", "cpsdmp.cli", "testcard", "init"]
                + ["--dir", str(directory), "--softhsm"],
                capture_output=True,
                timeout=120,
                text=True,
                cwd=working,
                env=environment,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            states.append(state(directory))
        self.assertIn("reused the test card", result.stdout)
        self.assertEqual(states[0], states[1])
        for folder in (home, temporary, working, decoy):
            self.assertEqual(list(folder.iterdir()), [], folder)
        self.assertEqual(system_state(), before)
        self.assertTrue(TestCard.load(directory).is_complete())

    def test_missing_card_message(self) -> None:
        with self.assertRaises(testcard.TestCardError) as raised:
            TestCard.load(Path("no-such-card").absolute())
        self.assertIn("cpsdmp testcard init", str(raised.exception))

    def test_damaged_description_remade(self) -> None:
        """
        A damaged testcard.json is reported by load, and init remakes the card.
        """
        directory = Path("testcard-damaged").absolute()
        directory.mkdir()
        (directory / "testcard.json").write_text('{"pin": "1234"}')
        with self.assertRaises(testcard.TestCardError) as raised:
            TestCard.load(directory)
        self.assertIn("lacks", str(raised.exception))
        card = init_testcard(directory, softhsm=False)
        self.assertTrue(card.is_complete())
        self.assertEqual(TestCard.load(directory), card)

    def test_unreadable_parts_remade(self) -> None:
        """
        A card whose files are there but do not read back (a damaged root, a
        soft card that no longer opens with the PIN) is made anew, and the
        report says why.
        """
        directory = Path("testcard-unreadable").absolute()
        first = init_testcard(directory, softhsm=False)
        reports: list[str] = []
        Path(first.ca_root).write_text("garbage")
        again = init_testcard(directory, softhsm=False, report=reports.append)
        self.assertIn("unreadable", reports[-1])
        self.assertEqual(again.damage(), None)
        Path(again.soft_card).write_bytes(os.urandom(100))
        init_testcard(directory, softhsm=False, report=reports.append)
        self.assertIn("soft-card.p12 does not open with the PIN", reports[-1])
        init_testcard(directory, softhsm=False, report=reports.append)
        self.assertEqual(reports[-1], f"reused the test card in {directory}")

    def test_unusable_folder(self) -> None:
        """
        A folder that is a file, cannot be made, or is not named is refused
        in one sentence.
        """
        Path("a-file").write_text("")
        for folder, expected in [
            ("a-file", "cannot use"),
            ("/proc/no-such/card", "cannot use"),
            ("", "name a folder"),
        ]:
            with self.assertRaises(testcard.TestCardError) as raised:
                init_testcard(folder, softhsm=False)
            self.assertIn(expected, str(raised.exception))


class TokenDamageTests(TestCase):
    def test_token_checked_on_reuse(self) -> None:
        """
        A token folder removed behind the card's back is noticed: the card
        is made anew, saying so.
        """
        directory = Path("testcard-token-damage").absolute()
        card = init_testcard(directory, softhsm=True)
        self.assertIsNone(card.damage())
        for child in Path(directory, "tokens").iterdir():
            for item in child.iterdir():
                item.unlink()
            child.rmdir()
        self.assertIn("reading the token failed", card.damage() or "")
        reports: list[str] = []
        init_testcard(directory, softhsm=True, report=reports.append)
        self.assertIn("made a new test card", reports[-1])


class TokenRemakeTests(TestCase):
    def test_only_its_own_token_removed(self) -> None:
        """
        A card made anew removes its old SoftHSM2 token folder and nothing
        else: a file of someone else's among the tokens stops it, in one
        sentence, before any file of the card is rewritten.
        """
        directory = Path("testcard-token-remade").absolute()
        card = init_testcard(directory, softhsm=True)
        tokens = directory / "tokens"
        (old,) = list(tokens.iterdir())
        Path(card.ca_root).write_text("garbage")
        (tokens / "important.txt").write_text("x\n")
        with self.assertRaises(testcard.UnusableFolder) as raised:
            init_testcard(directory, softhsm=True)
        self.assertIn("important.txt is not a SoftHSM2 token", str(raised.exception))
        self.assertEqual((tokens / "important.txt").read_text(), "x\n")
        self.assertEqual(Path(card.ca_root).read_text(), "garbage")

        (tokens / "important.txt").unlink()
        again = init_testcard(directory, softhsm=True)
        self.assertIsNone(again.damage())
        (new,) = list(tokens.iterdir())
        self.assertNotEqual(new.name, old.name)


_SECOND = testcard.pki.Professional(
    id="810009876543",
    given_name="Paul",
    family_name="MARTIN-TEST",
    profession="Médecin",
    profession_code="10",
    specialty="G15_10/SM54",
    organization="CABINET CPSDMP TEST",
)


class SharedPkiTests(TestCase):
    """
    Several professionals' cards issued under one test PKI, so that one
    local DMP trusts them all.
    """

    def test_authority_key_only_when_asked(self) -> None:
        """
        A card keeps its persons authority's key only when asked, readable by
        its owner alone; a card without it cannot issue others and says how
        to fix that.
        """
        soft = _soft_card()
        self.assertIsNone(soft.ca_persons_key)
        self.assertFalse(Path(soft.directory, "ca-persons-key.pem").exists())
        with self.assertRaises(testcard.TestCardError) as raised:
            init_testcard(Path("issued-by-soft").absolute(), issuer=soft, softhsm=False)
        self.assertIn("keep_authority_keys=True", str(raised.exception))

        first = init_testcard(
            Path("issuer-soft").absolute(), softhsm=False, keep_authority_keys=True
        )
        assert first.ca_persons_key is not None
        key_file = Path(first.ca_persons_key)
        self.assertEqual(key_file.name, "ca-persons-key.pem")
        self.assertEqual(key_file.stat().st_mode & 0o777, 0o600)
        authority = first.persons_authority()
        self.assertEqual(
            authority.key.public_key().public_numbers(),
            first.ca_intermediate_certificates()[0].public_key().public_numbers(),
        )

    def test_second_card_same_pki(self) -> None:
        """
        A card issued by another is its own token, with its own label,
        configuration and holder, and its certificates, on the token and in
        the soft card, validate under the first card's root; the local DMP's
        certificate is the same; initialising it again reuses it.
        """
        first = init_testcard(
            Path("issuer-token").absolute(), softhsm=True, keep_authority_keys=True
        )
        directory = Path("second-token").absolute()
        second = init_testcard(
            directory,
            softhsm=True,
            token_label="CPS TEST 2",
            professional=_SECOND,
            issuer=first,
        )
        self.assertEqual(second.token_label, "CPS TEST 2")
        self.assertNotEqual(second.softhsm2_conf, first.softhsm2_conf)
        self.assertEqual(second.professional["id"], _SECOND.id)
        self.assertIsNone(second.ca_persons_key)
        self.assertEqual(second.ca_root_certificate(), first.ca_root_certificate())
        self.assertEqual(
            Path(second.sandbox_cert).read_bytes(),
            Path(first.sandbox_cert).read_bytes(),
        )
        self.assertTrue(Path(second.ca_root).is_relative_to(directory))
        self.assertIsNone(second.damage())

        # The certificate on the token, read back with OpenSC.
        exported = directory / "read-back.der"
        assert second.pkcs11_module and second.token_label
        subprocess.run(
            [
                "pkcs11-tool",
                "--module",
                second.pkcs11_module,
                "--token-label",
                second.token_label,
                "--read-object",
                "--type",
                "cert",
                "--id",
                testcard.AUTHENTICATION_ID,
                "--output-file",
                str(exported),
            ],
            env={**os.environ, **second.environment()},
            capture_output=True,
            check=True,
            timeout=60,
        )
        on_token = x509.load_der_x509_certificate(exported.read_bytes())
        exported.unlink()
        persons = first.ca_intermediate_certificates()[0]
        path = verify_card_chain([on_token, persons], [first.ca_root_certificate()])
        self.assertEqual(path[-1], first.ca_root_certificate())
        common_name = on_token.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        self.assertEqual(common_name[0].value, f"{_SECOND.id}/{_SECOND.name}")

        loaded = pkcs12.load_pkcs12(
            Path(second.soft_card).read_bytes(), second.pin.encode()
        )
        assert loaded.cert is not None
        verify_card_chain(
            [
                loaded.cert.certificate,
                *(c.certificate for c in loaded.additional_certs),
            ],
            [first.ca_root_certificate()],
        )

        reports: list[str] = []
        again = init_testcard(
            directory,
            softhsm=True,
            token_label="CPS TEST 2",
            professional=_SECOND,
            issuer=first,
            report=reports.append,
        )
        self.assertEqual(again, second)
        self.assertIn("reused", reports[0])

    def test_remade_under_another_root(self) -> None:
        """
        A card in the folder issued under another root is remade when an
        issuer is given, so that the local DMP trusts it.
        """
        directory = Path("was-alone").absolute()
        alone_root = init_testcard(directory, softhsm=False).ca_root_certificate()
        issuer = init_testcard(
            Path("issuer-other").absolute(), softhsm=False, keep_authority_keys=True
        )
        reports: list[str] = []
        issued = init_testcard(
            directory, softhsm=False, issuer=issuer, report=reports.append
        )
        self.assertNotEqual(issued.ca_root_certificate(), alone_root)
        self.assertEqual(issued.ca_root_certificate(), issuer.ca_root_certificate())
        self.assertIn("another root", reports[0])
