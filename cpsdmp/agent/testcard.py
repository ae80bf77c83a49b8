"""
A test CPS card and the test PKI around it, all kept in one folder.

The card is a SoftHSM2 token set up the way a real CPS card is: the keys are
generated on the token by OpenSC's C{pkcs11-tool} (so they never exist
outside it), the certificates are then issued for their public keys and
written beside them with the card's labels and C{CKA_ID}s. The
authentication key accepts only C{CKM_RSA_PKCS}, like a CPS3 card, so no
test can pass with a mechanism the real card refuses. A PKCS#12 "soft card"
with the same holder serves on machines without SoftHSM2.

Everything lives in the folder: SoftHSM2 gets its own C{softhsm2.conf} there
and the system's configuration is never read or written. C{testcard.json}
describes the result; running the initialisation again reuses it.

Several professionals' cards can share one test PKI, so that one local DMP
trusts them all: the first card is made with C{keep_authority_keys=True},
which leaves the persons authority's private key in its folder as
C{ca-persons-key.pem} (mode 0600, a test key and nothing more), and each
other card is made with C{issuer=} that first card, reusing its root, its
authorities and the local DMP's certificate.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from cpsdmp.agent import pki

AUTHENTICATION_KEY_LABEL = "CPS_PRIV_AUT"
SIGNATURE_KEY_LABEL = "CPS_PRIV_SIG"
AUTHENTICATION_CERTIFICATE_LABEL = "Certificat d'Authentification CPS"
SIGNATURE_CERTIFICATE_LABEL = "Certificat de Signature CPS"
AUTHENTICATION_ID = "01"
SIGNATURE_ID = "02"

DEFAULT_PIN = "1234"
DEFAULT_TOKEN_LABEL = "CPS TEST"

DEFAULT_PROFESSIONAL = pki.Professional(
    id="810001234567",
    given_name="Marie",
    family_name="DURAND-TEST",
    profession="Médecin",
    profession_code="10",
    specialty="G15_10/SM54",
    organization="CABINET CPSDMP TEST",
)

# Where Debian and other distributions put SoftHSM2's PKCS#11 module.
SOFTHSM2_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


class TestCardError(Exception):
    """
    The test card could not be made; the message says which step failed.
    """


class UnusableFolder(TestCardError):
    """
    The folder asked for cannot hold a test card: it is not named, it is a
    file, it cannot be made or locked, or it holds files that are not a
    test card's.
    """


def find_softhsm2_module() -> str | None:
    """
    @return: the path of SoftHSM2's PKCS#11 module, or C{None} if it is not
        installed (C{CPSDMP_SOFTHSM2_MODULE} overrides the search).
    """
    explicit = os.environ.get("CPSDMP_SOFTHSM2_MODULE")
    candidates = [explicit] if explicit else SOFTHSM2_MODULES
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def softhsm2_missing() -> str | None:
    """
    @return: why a SoftHSM2 test card cannot be made here, or C{None} if it can.
    """
    if find_softhsm2_module() is None:
        return "SoftHSM2's PKCS#11 module is not installed (Debian: softhsm2)"
    for tool, package in [("softhsm2-util", "softhsm2"), ("pkcs11-tool", "opensc")]:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: {package})"
    return None


@dataclass
class TestCard:
    """
    What C{testcard.json} describes: the card, its PIN, and the test PKI.

    Paths are absolute. C{pkcs11_module}, C{token_label} and
    C{softhsm2_conf} are C{None} for a soft-card-only setup.
    """

    __test__ = False  # not a test case, whatever its name says

    directory: str
    pin: str
    pkcs11_module: str | None
    token_label: str | None
    softhsm2_conf: str | None
    soft_card: str
    soft_card_signature: str
    ca_root: str
    ca_intermediates: list[str]
    sandbox_cert: str
    sandbox_key: str
    professional: dict[str, str]
    so_pin: str | None = None
    files: list[str] = field(default_factory=list)
    ca_persons_key: str | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TestCard:
        """
        @raise TestCardError: when the folder holds no test card.
        """
        path = Path(directory) / "testcard.json"
        try:
            content = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise TestCardError(
                f"no test card in {directory}: run `cpsdmp testcard init --dir "
                f"{directory}` first"
            ) from None
        except (ValueError, UnicodeDecodeError) as e:
            raise TestCardError(f"{path} is not valid JSON: {e}") from None
        known = set(cls.__dataclass_fields__)
        if not isinstance(content, dict):
            raise TestCardError(f"{path} does not describe a test card")
        try:
            return cls(**{k: v for k, v in content.items() if k in known})
        except TypeError:
            missing = sorted(
                known - set(content) - {"so_pin", "files", "ca_persons_key"}
            )
            raise TestCardError(
                f"{path} lacks {', '.join(missing)}: run `cpsdmp testcard init "
                f"--dir {directory}` again to remake the card"
            ) from None

    @property
    def has_token(self) -> bool:
        return self.pkcs11_module is not None

    def is_complete(self) -> bool:
        """
        @return: whether every file the description names is still there.
        """
        return all(Path(self.directory, name).exists() for name in self.files)

    def damage(self) -> str | None:
        """
        Read back what the description names: the certificates, the soft
        cards with the PIN, and the token's keys and certificates.

        @return: what is missing or unreadable, or C{None} if all is sound.
        """
        missing = [n for n in self.files if not Path(self.directory, n).exists()]
        if missing:
            return f"{', '.join(missing)} missing"
        try:
            for path in [self.ca_root, *self.ca_intermediates, self.sandbox_cert]:
                x509.load_pem_x509_certificates(Path(path).read_bytes())
            serialization.load_pem_private_key(
                Path(self.sandbox_key).read_bytes(), password=None
            )
        except ValueError as e:
            return f"a certificate or key file is unreadable ({e})"
        for path in [self.soft_card, self.soft_card_signature]:
            try:
                pkcs12.load_pkcs12(Path(path).read_bytes(), self.pin.encode())
            except ValueError:
                return f"{Path(path).name} does not open with the PIN"
        if self.has_token:
            return _token_damage(self)
        return None

    def environment(self) -> dict[str, str]:
        """
        @return: the environment variables a process needs to open the token.
        """
        return {"SOFTHSM2_CONF": self.softhsm2_conf} if self.softhsm2_conf else {}

    def ca_root_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(Path(self.ca_root).read_bytes())

    def ca_intermediate_certificates(self) -> list[x509.Certificate]:
        return [
            x509.load_pem_x509_certificate(Path(p).read_bytes())
            for p in self.ca_intermediates
        ]

    def persons_authority(self) -> pki.Authority:
        """
        @return: the authority that issued this card's certificates, with its
            private key, to issue other professionals' cards under the same
            root.
        @raise TestCardError: when the card was made without keeping it.
        """
        if not self.ca_persons_key:
            raise TestCardError(
                f"the test card in {self.directory} kept no authority key: make "
                "it again with keep_authority_keys=True to issue other cards"
            )
        try:
            key = serialization.load_pem_private_key(
                Path(self.ca_persons_key).read_bytes(), password=None
            )
            certificate = x509.load_pem_x509_certificate(
                Path(self.ca_intermediates[0]).read_bytes()
            )
        except (OSError, ValueError) as e:
            raise TestCardError(
                f"cannot read the persons authority of {self.directory}: {e}"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TestCardError(f"{self.ca_persons_key} is not an RSA key")
        return pki.Authority(key, certificate)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / _LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def init_testcard(
    directory: str | os.PathLike[str],
    *,
    softhsm: bool | None = None,
    pin: str = DEFAULT_PIN,
    token_label: str = DEFAULT_TOKEN_LABEL,
    professional: pki.Professional = DEFAULT_PROFESSIONAL,
    report: Callable[[str], object] = lambda _: None,
    issuer: TestCard | None = None,
    keep_authority_keys: bool = False,
) -> TestCard:
    """
    Make the test PKI and the test card in C{directory}, or reuse them when
    they read back whole.

    @param softhsm: C{True} to require a SoftHSM2 token, C{False} for a soft
        card only, C{None} for a token when SoftHSM2 is installed.
    @param issuer: a test card made with C{keep_authority_keys}: the new card
        is issued by its persons authority, under its root, and the local
        DMP's certificate is its own, so that one local DMP trusts both.
        Give each such card its own folder and C{token_label}.
    @param keep_authority_keys: write the persons authority's private key
        into the folder (C{ca-persons-key.pem}, mode 0600) so that this card
        can be the C{issuer} of others.
    @param report: called with one sentence saying whether the card was
        reused or made, and why.
    @raise TestCardError: when the folder cannot be used or a step fails,
        naming it.
    """
    if not str(directory).strip():
        raise UnusableFolder("the test card's folder is empty: name a folder")
    folder = Path(directory).resolve()
    _check_own(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = _locked(folder)
        lock.__enter__()
    except FileExistsError:
        # mkdir with exist_ok: something other than a folder is there.
        raise UnusableFolder(
            f"cannot use {folder} for a test card: it is not a folder"
        ) from None
    except OSError as e:
        raise UnusableFolder(
            f"cannot use {folder} for a test card: {e.strerror}"
        ) from None
    try:
        try:
            existing: TestCard | None = TestCard.load(folder)
        except TestCardError as e:
            existing = None
            why = "no test card there" if "no test card" in str(e) else str(e)
        if existing is not None:
            wants_token = softhsm if softhsm is not None else existing.has_token
            damage = existing.damage()
            if damage is None and issuer is not None:
                damage = _issuer_mismatch(existing, issuer)
            if damage is None and keep_authority_keys and not existing.ca_persons_key:
                damage = "the authority key was asked to be kept"
            if damage is None and existing.has_token == wants_token:
                report(f"reused the test card in {folder}")
                return existing
            why = damage or (
                "a SoftHSM2 token was asked for" if wants_token else "no token wanted"
            )
        if softhsm is None:
            softhsm = softhsm2_missing() is None
        elif softhsm and (reason := softhsm2_missing()):
            raise TestCardError(f"cannot make a SoftHSM2 test card: {reason}")
        if softhsm:
            # Refused before anything is written, if it holds what is not ours.
            _own_token_folders(folder / "tokens")
        try:
            card = _build(
                folder,
                softhsm,
                pin,
                token_label,
                professional,
                issuer=issuer,
                keep_authority_keys=keep_authority_keys,
            )
        except OSError as e:
            raise TestCardError(
                f"cannot write the test card in {folder}: {e}"
            ) from None
        report(f"made a new test card in {folder} ({why})")
        return card
    finally:
        lock.__exit__(None, None, None)


# What a test card's folder holds once made, or while it is made.
_LOCK_NAME = ".testcard.lock"
_DESCRIPTION_NAME = "testcard.json"

# The files of a SoftHSM2 token folder (directories.tokendir/<uuid>/).
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_TOKEN_FOLDER = re.compile(_UUID)
_TOKEN_FILE = re.compile(rf"generation|(token|{_UUID})\.(object|lock)")


def _check_own(folder: Path) -> None:
    """
    Refuse, touching nothing, an existing folder that holds files but no
    test card: init writes only in an empty or new folder, or in one where
    it made a test card before.

    @raise UnusableFolder: naming the folder.
    """
    try:
        names = {p.name for p in folder.iterdir()}
    except FileNotFoundError:
        return
    except NotADirectoryError:
        return  # said when the folder is made
    except OSError as e:
        raise UnusableFolder(
            f"cannot use {folder} for a test card: {e.strerror}"
        ) from None
    if names and not names & {_DESCRIPTION_NAME, _LOCK_NAME}:
        raise UnusableFolder(
            f"cannot use {folder} for a test card: it holds files but no test "
            f"card ({_DESCRIPTION_NAME}); name an empty or new folder"
        )


def _own_token_folders(tokens: Path) -> list[Path]:
    """
    @return: the SoftHSM2 token folders in C{tokens}, which a new token
        replaces.
    @raise UnusableFolder: if C{tokens} holds anything else, naming it:
        nothing that init did not make is removed.
    """
    if not tokens.exists():
        return []
    if not tokens.is_dir() or tokens.is_symlink():
        raise UnusableFolder(
            f"cannot make the test card's token in {tokens}: it is not a folder "
            "the test card made; move it away"
        )
    own = []
    for entry in sorted(tokens.iterdir()):
        if (
            entry.is_dir()
            and not entry.is_symlink()
            and _TOKEN_FOLDER.fullmatch(entry.name)
            and all(
                f.is_file() and _TOKEN_FILE.fullmatch(f.name) for f in entry.iterdir()
            )
        ):
            own.append(entry)
            continue
        raise UnusableFolder(
            f"cannot make the test card's token in {tokens}: {entry.name} is "
            "not a SoftHSM2 token the test card made; move it away"
        )
    return own


def _issuer_mismatch(card: TestCard, issuer: TestCard) -> str | None:
    """
    @return: why C{card} was not issued under C{issuer}'s root, or C{None}.
    """
    try:
        same = Path(card.ca_root).read_bytes() == Path(issuer.ca_root).read_bytes()
    except OSError as e:
        return f"cannot compare the roots: {e}"
    return None if same else "it was issued under another root"


def _token_damage(card: TestCard) -> str | None:
    """
    @return: what the token lacks of a CPS card's objects, or C{None}.
    """
    assert card.pkcs11_module and card.token_label and card.softhsm2_conf
    tools = _Tools(
        card.pkcs11_module, Path(card.softhsm2_conf), card.token_label, card.pin
    )
    try:
        listing = tools.pkcs11("reading the token", "--list-objects").decode(
            "utf-8", "replace"
        )
    except TestCardError as e:
        return str(e)
    for label in [
        AUTHENTICATION_KEY_LABEL,
        SIGNATURE_KEY_LABEL,
        AUTHENTICATION_CERTIFICATE_LABEL,
        SIGNATURE_CERTIFICATE_LABEL,
    ]:
        if f"label:      {label}" not in listing:
            return f"the token has no {label!r}"
    return None


def _write(path: Path, data: bytes, *, secret: bool = False) -> str:
    path.write_bytes(data)
    if secret:
        path.chmod(0o600)
    return path.name


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _build(
    folder: Path,
    softhsm: bool,
    pin: str,
    token_label: str,
    professional: pki.Professional,
    *,
    issuer: TestCard | None = None,
    keep_authority_keys: bool = False,
) -> TestCard:
    files: list[str] = []

    if issuer is None:
        authority = pki.make_root()
        root = authority.certificate
        persons = pki.make_intermediate(
            authority, "TEST AC IGC-SANTE ELEMENTAIRE PERSONNES"
        )
        servers = pki.make_intermediate(
            authority, "TEST AC IGC-SANTE ELEMENTAIRE ORGANISATIONS"
        )
        sandbox_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        sandbox_certificate = pki.server_certificate(
            servers, sandbox_key.public_key(), ["localhost"], ["127.0.0.1", "::1"]
        )
        shared = {
            "ca-root.pem": _pem(root),
            "ca-persons.pem": _pem(persons.certificate),
            "ca-servers.pem": _pem(servers.certificate),
            "sandbox.pem": _pem(sandbox_certificate) + _pem(servers.certificate),
        }
        sandbox_key_pem = _private_pem(sandbox_key)
    else:
        # The same root, authorities and local DMP certificate as the
        # issuer's: copies, so that this folder stands on its own.
        persons = issuer.persons_authority()
        root = issuer.ca_root_certificate()
        try:
            shared = {
                "ca-root.pem": Path(issuer.ca_root).read_bytes(),
                "ca-persons.pem": Path(issuer.ca_intermediates[0]).read_bytes(),
                "ca-servers.pem": Path(issuer.ca_intermediates[1]).read_bytes(),
                "sandbox.pem": Path(issuer.sandbox_cert).read_bytes(),
            }
            sandbox_key_pem = Path(issuer.sandbox_key).read_bytes()
        except (OSError, IndexError) as e:
            raise TestCardError(
                f"cannot read the issuer's test PKI in {issuer.directory}: {e}"
            ) from None
    for name, data in shared.items():
        files.append(_write(folder / name, data))
    files.append(_write(folder / "sandbox-key.pem", sandbox_key_pem, secret=True))
    ca_persons_key: str | None = None
    if keep_authority_keys:
        files.append(
            _write(
                folder / "ca-persons-key.pem",
                _private_pem(persons.key),
                secret=True,
            )
        )
        ca_persons_key = str(folder / "ca-persons-key.pem")

    chain = [persons.certificate, root]
    for usage, name in [
        ("authentication", "soft-card.p12"),
        ("signature", "soft-card-signature.p12"),
    ]:
        files.append(
            _write(
                folder / name,
                _soft_card(persons, chain, professional, usage, pin),
                secret=True,
            )
        )

    token: dict[str, Any] = {
        "pkcs11_module": None,
        "token_label": None,
        "softhsm2_conf": None,
        "so_pin": None,
    }
    if softhsm:
        token = _make_token(folder, persons, professional, pin, token_label)
        files += ["softhsm2.conf", "tokens"]

    card = TestCard(
        directory=str(folder),
        pin=pin,
        soft_card=str(folder / "soft-card.p12"),
        soft_card_signature=str(folder / "soft-card-signature.p12"),
        ca_root=str(folder / "ca-root.pem"),
        ca_intermediates=[
            str(folder / "ca-persons.pem"),
            str(folder / "ca-servers.pem"),
        ],
        sandbox_cert=str(folder / "sandbox.pem"),
        sandbox_key=str(folder / "sandbox-key.pem"),
        professional={
            "id": professional.id,
            "name": professional.name,
            "given_name": professional.given_name,
            "family_name": professional.family_name,
            "profession": professional.profession,
            "profession_code": professional.profession_code,
            "specialty": professional.specialty,
            "organization": professional.organization,
        },
        files=files,
        ca_persons_key=ca_persons_key,
        **token,
    )
    description = json.dumps(asdict(card), indent=2, ensure_ascii=False)
    _write(folder / "testcard.json", description.encode("utf-8") + b"\n", secret=True)
    return card


def _soft_card(
    authority: pki.Authority,
    chain: Sequence[x509.Certificate],
    professional: pki.Professional,
    usage: str,
    pin: str,
) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certificate = pki.card_certificate(authority, key.public_key(), professional, usage)
    label = (
        AUTHENTICATION_CERTIFICATE_LABEL
        if usage == "authentication"
        else SIGNATURE_CERTIFICATE_LABEL
    )
    return pkcs12.serialize_key_and_certificates(
        label.encode("utf-8"),
        key,
        certificate,
        list(chain),
        serialization.BestAvailableEncryption(pin.encode("utf-8")),
    )


class _Tools:
    """
    The command-line tools that set up a SoftHSM2 token, bound to the test
    card's own configuration.
    """

    def __init__(self, module: str, conf: Path, token_label: str, pin: str) -> None:
        self._module = module
        self._token_label = token_label
        self._pin = pin
        self._env = {**os.environ, "SOFTHSM2_CONF": str(conf)}

    def run(self, step: str, argv: list[str]) -> bytes:
        try:
            completed = subprocess.run(
                argv, env=self._env, capture_output=True, timeout=120, check=False
            )
        except subprocess.TimeoutExpired:
            raise TestCardError(f"{step}: {argv[0]} did not finish in 120 s") from None
        if completed.returncode != 0:
            # The PIN is on the command line; never echo the command itself.
            detail = completed.stderr.decode("utf-8", "replace").strip()
            raise TestCardError(f"{step} failed ({argv[0]}): {detail}")
        return completed.stdout

    def pkcs11(self, step: str, *arguments: str) -> bytes:
        return self.run(
            step,
            [
                "pkcs11-tool",
                "--module",
                self._module,
                "--token-label",
                self._token_label,
                "--login",
                "--pin",
                self._pin,
                *arguments,
            ],
        )


def _make_token(
    folder: Path,
    authority: pki.Authority,
    professional: pki.Professional,
    pin: str,
    token_label: str,
) -> dict[str, Any]:
    module = find_softhsm2_module()
    assert module is not None
    tokens = folder / "tokens"
    for token in _own_token_folders(tokens):
        shutil.rmtree(token)
    tokens.mkdir(mode=0o700, exist_ok=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n",
        "utf-8",
    )
    so_pin = secrets.token_hex(8)
    tools = _Tools(module, conf, token_label, pin)
    tools.run(
        "initialising the SoftHSM2 token",
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            token_label,
            "--so-pin",
            so_pin,
            "--pin",
            pin,
        ],
    )

    keys: Mapping[str, tuple[str, str, str, str]] = {
        "authentication": (
            AUTHENTICATION_ID,
            AUTHENTICATION_KEY_LABEL,
            AUTHENTICATION_CERTIFICATE_LABEL,
            # The CPS3 authentication key signs a caller-made DigestInfo only.
            "RSA-PKCS",
        ),
        "signature": (
            SIGNATURE_ID,
            SIGNATURE_KEY_LABEL,
            SIGNATURE_CERTIFICATE_LABEL,
            "RSA-PKCS,SHA1-RSA-PKCS,SHA256-RSA-PKCS,SHA384-RSA-PKCS,SHA512-RSA-PKCS",
        ),
    }
    for usage, (key_id, key_label, certificate_label, mechanisms) in keys.items():
        tools.pkcs11(
            f"generating the {usage} key on the token",
            "--keypairgen",
            "--key-type",
            "rsa:2048",
            "--id",
            key_id,
            "--label",
            key_label,
            "--usage-sign",
            "--allowed-mechanisms",
            mechanisms,
        )
        public_der = folder / f"{usage}-public.der"
        tools.pkcs11(
            f"reading the {usage} public key",
            "--read-object",
            "--type",
            "pubkey",
            "--id",
            key_id,
            "--output-file",
            str(public_der),
        )
        public_key = serialization.load_der_public_key(public_der.read_bytes())
        public_der.unlink()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise TestCardError(f"the token made a non-RSA {usage} key")
        certificate = pki.card_certificate(authority, public_key, professional, usage)
        certificate_der = folder / f"{usage}.der"
        certificate_der.write_bytes(
            certificate.public_bytes(serialization.Encoding.DER)
        )
        tools.pkcs11(
            f"writing the {usage} certificate to the token",
            "--write-object",
            str(certificate_der),
            "--type",
            "cert",
            "--id",
            key_id,
            "--label",
            certificate_label,
        )
        certificate_der.unlink()

    return {
        "pkcs11_module": module,
        "token_label": token_label,
        "softhsm2_conf": str(conf),
        "so_pin": so_pin,
    }
