"""
Benchmarks of the DMP message layer: metadata derivation and TD2.1 building
per document (the ANS example CDAs), and the peak memory of building,
signing, writing out and reading back one large submission.

Run from the repository root:

    python benchmarks/xds/bench.py [--size-mb 50] [--rounds 200]

The memory figures come from a fresh child process per measurement
(resource.getrusage ru_maxrss, the peak resident set size), so that one
measurement does not inherit another's peak.

Beside each large build, in the same run, the floor: the openssl command
line doing the cryptographic work that the build does on the same file,
the document's SHA-1 (its XDS hash) and, when signed, its SHA-256 (the
XAdES reference's digest) and an RSA-2048 signature.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from cpsdmp._fixtures import fixtures_dir  # noqa: E402
from cpsdmp.xds.cda import SYNTHESE, CdaError, document_entry  # noqa: E402
from cpsdmp.xds.context import (  # noqa: E402
    Professional,
    Software,
    Structure,
    StructureIdentifier,
    SubmissionDefaults,
)
from cpsdmp.xds.ebrim import INS_OID_TEST, CodedValue  # noqa: E402
from cpsdmp.xds.transactions import (  # noqa: E402
    DmpEndpoints,
    new_submission,
    provide_and_register,
)
from cpsdmp.xds.vihf import VihfRequest  # noqa: E402

PROFESSIONAL = Professional(
    "899900063480",
    "LIBRE",
    "MAX",
    CodedValue("10", "1.2.250.1.71.1.2.7", "Médecin"),
    CodedValue("SM26", "1.2.250.1.71.4.2.5", "Qualifié en Médecine Générale (SM)"),
)
SECTOR = CodedValue("SA07", "1.2.250.1.71.4.2.4", "Cabinet individuel")
PRACTICE = CodedValue("AMBULATOIRE", "1.2.250.1.213.1.1.4.9", "Ambulatoire")
STRUCTURE = Structure(
    "CABINET", StructureIdentifier.RPPS_PRACTICE, "99900063480001", SECTOR, PRACTICE
)
SOFTWARE = Software("bench", "1", "NumAutorisation", "1.2.250.1.999.1.1.7898")
DEFAULTS = SubmissionDefaults(
    INS_OID_TEST, CodedValue("04", "1.2.250.1.213.2.2", "Hospitalisation de jour")
)
ENDPOINTS = DmpEndpoints("https://dmp.example/si-dmp-server/v2/services")


def overrides_for(data: bytes) -> dict[str, object]:
    # The example CDAs whose typeCode the classCode table does not list get
    # one given, as a user would with --class-code.
    try:
        document_entry(data, STRUCTURE)
    except CdaError:
        return {"classCode": SYNTHESE}
    return {}


def derive(data: bytes, overrides: dict[str, object] | None = None):
    return document_entry(data, STRUCTURE, overrides=overrides)


def per_document(rounds: int) -> dict[str, dict[str, float]]:
    folder = fixtures_dir()
    if folder is None:
        raise SystemExit("the public DMP material is needed (CPSDMP_FIXTURES)")
    results = {}
    for path in sorted((folder / "ans-testcontenucda-3-0/ExemplesCDA").glob("*.xml")):
        data = path.read_bytes()
        derive_times, build_times = [], []
        overrides = overrides_for(data)
        for _ in range(rounds):
            start = time.perf_counter()
            entry = derive(data, overrides)
            derive_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            submission = new_submission(
                [(entry, data)], PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
            )
            vihf = VihfRequest(
                PROFESSIONAL, STRUCTURE, SOFTWARE, "CN=bench", entry.patientId
            )
            message = provide_and_register(ENDPOINTS, vihf, submission)
            for _part in message.parts():
                pass
            build_times.append(time.perf_counter() - start)
        results[path.name] = {
            "bytes": len(data),
            "metadata_ms_median": statistics.median(derive_times) * 1000,
            "td21_build_ms_median": statistics.median(build_times) * 1000,
        }
    return results


CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[3])
sys.path.insert(0, sys.argv[4])
from bench import *
from cryptography.hazmat.primitives.asymmetric import rsa
from cpsdmp.xds.signature import local_signer, sign_submission
from cpsdmp.protocols.soap import read_message
from tests.pki import self_signed

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

mode = sys.argv[2]
key, certificate = self_signed(rsa.generate_private_key(65537, 2048))
baseline = peak()
with open(sys.argv[1], "rb") as f:
    data = f.read()
after_read = peak()
start = time.perf_counter()
entry = derive(data)
submission = new_submission(
    [(entry, data)], PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
)
if mode != "nosign":
    signed = []
    sign_submission(submission, local_signer(key), certificate, PROFESSIONAL,
                    STRUCTURE).addCallback(signed.append)
    assert signed
vihf = VihfRequest(PROFESSIONAL, STRUCTURE, SOFTWARE, "CN=bench", entry.patientId)
message = provide_and_register(ENDPOINTS, vihf, submission)
written = 0
with open(os.devnull, "wb") as sink:
    for part in message.parts():
        sink.write(part)
        written += len(part)
built = time.perf_counter() - start
after_build = peak()
read_seconds = None
if mode == "readback":
    body = b"".join(message.parts())
    start = time.perf_counter()
    response = read_message(message.content_type, body)
    holder = response.body.find("{urn:ihe:iti:xds-b:2007}Document")
    assert response.binary(holder) == data
    read_seconds = time.perf_counter() - start
print(json.dumps({
    "document": len(data), "body": written, "baseline": baseline,
    "after_read": after_read, "after_build": after_build, "final": peak(),
    "build_seconds": built, "read_seconds": read_seconds,
}))
"""


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def openssl_floor(path: str, mode: str, folder: str) -> float:
    """
    @return: the seconds that the openssl command line takes to do the
        build's cryptographic work on the document at C{path}, the best of
        three: SHA-1 of the file, and when C{mode} signs, SHA-256 of it and
        an RSA-2048 signature (with a key made beforehand, not timed).
    """
    key = os.path.join(folder, "key.pem")
    if not os.path.exists(key):
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "RSA", "-out", key]
            + ["-pkeyopt", "rsa_keygen_bits:2048"],
            check=True,
            capture_output=True,
        )
    best = None
    for _ in range(3):
        seconds = _timed(["openssl", "dgst", "-sha1", path])
        if mode != "nosign":
            seconds += _timed(["openssl", "dgst", "-sha256", "-sign", key, path])
        best = seconds if best is None else min(best, seconds)
    assert best is not None
    return best


def large(size_mb: int, mode: str) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".xml", delete=False) as f:
        folder = fixtures_dir()
        path = (
            folder
            / "ans-testcontenucda-3-0/ExemplesCDA/DOC_NON_STRUCTURE_CDA-R2-N1.xml"
        )
        head, _, rest = path.read_bytes().partition(b'representation="B64">')
        tail = rest[rest.index(b"</text>") :]
        f.write(head + b'representation="B64">')
        block = b"JVBERi0x" * (1024 * 1024 // 8)
        for _ in range(size_mb):
            f.write(block)
        f.write(tail)
    try:
        output = subprocess.run(
            [sys.executable, "-c", CHILD, f.name, mode, str(ROOT), str(HERE)],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
        with tempfile.TemporaryDirectory() as folder:
            floor = openssl_floor(f.name, mode, folder)
    finally:
        os.unlink(f.name)
    figures = json.loads(output)
    figures["openssl_seconds"] = floor
    figures["build_over_openssl"] = figures["build_seconds"] / floor
    document = figures["document"]
    figures["build_peak_over_document"] = (
        figures["after_build"] - figures["baseline"]
    ) / document
    figures["final_peak_over_document"] = (
        figures["final"] - figures["baseline"]
    ) / document
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps({"per_document": per_document(args.rounds)}, indent=2))
    for mode in ["nosign", "sign", "readback"]:
        print(json.dumps({f"large_{mode}": large(args.size_mb, mode)}, indent=2))


if __name__ == "__main__":
    main()
