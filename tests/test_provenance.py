"""C2PA Content Credentials (utils/safety/provenance.py): what the manifest holds (every field, against an
allow-list: no selfie, crop, embedding or id), how a file reads back (valid / untrusted / tampered /
absent), and where the signer comes from (operator certificate, or a development CA made once)."""
from __future__ import annotations

import datetime as dt
import io
import json
import re
import struct
import threading
from pathlib import Path

import pytest
from PIL import Image

from tests import photos
from utils.config import Settings
from utils.errors import ConfigError
from utils.safety import provenance as pv

GEN = pv.Generator("digital-twin-generator", "1.4.0", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "plus-face")


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("c2pa-data") / "c2pa"


@pytest.fixture(scope="module")
def signer(dev_dir) -> pv.ContentSigner:
    return pv.load_signer(None, None, dev_dir)


def image_bytes(fmt: str, size=(320, 400)) -> bytes:
    buf = io.BytesIO()
    photos.astronaut().resize(size).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def png_chunks(data: bytes) -> list[tuple[str, int, int]]:
    """(type, payload start, payload length) of every PNG chunk."""
    out, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        out.append((kind.decode("latin-1"), at + 8, length))
        at += 12 + length
    return out


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, payload start, payload length) up to the start of scan."""
    out, at = [], 2
    while at < len(data):
        marker, length = data[at + 1], struct.unpack(">H", data[at + 2:at + 4])[0]
        out.append((marker, at + 4, length - 2))
        if marker == 0xDA:
            break
        at += 2 + length
    return out


def flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def pixel_byte(data: bytes) -> int:
    """An offset inside the compressed pixels."""
    if data.startswith(pv.PNG_MAGIC):
        _, start, length = next(c for c in png_chunks(data) if c[0] == "IDAT")
        return start + length // 2
    _, start, length = jpeg_segments(data)[-1]
    return (start + length + len(data)) // 2


def manifest_byte(data: bytes) -> int:
    """An offset inside the embedded manifest store (PNG caBX chunk; JPEG APP11 JUMBF segments)."""
    if data.startswith(pv.PNG_MAGIC):
        _, start, length = next(c for c in png_chunks(data) if c[0] == "caBX")
    else:
        _, start, length = [s for s in jpeg_segments(data) if s[0] == 0xEB][-1]
    return start + length - 40   # near the end: inside the claim signature


def leaves(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for v in obj:
            yield from leaves(v, f"{path}/[]")
    else:
        yield path, obj


# Every field the signed manifest store may hold (validation results aside): anything else, a new
# assertion, an ingredient (a selfie), a thumbnail, an id, fails this test.
ALLOWED_FIELDS = {
    "/active_manifest", "/validation_state",
    "/manifests/M/claim/instanceID", "/manifests/M/claim/claim_generator_info/name",
    "/manifests/M/claim/claim_generator_info/version", "/manifests/M/claim/claim_generator_info/org.contentauth.c2pa_rs",
    "/manifests/M/claim/signature", "/manifests/M/claim/created_assertions/[]/url",
    "/manifests/M/claim/created_assertions/[]/hash", "/manifests/M/claim/gathered_assertions/[]/url",
    "/manifests/M/claim/gathered_assertions/[]/hash", "/manifests/M/claim/alg", "/manifests/M/claim/claim_version",
    "/manifests/M/assertion_store/c2pa.actions.v2/actions/[]/action",
    "/manifests/M/assertion_store/c2pa.actions.v2/actions/[]/when",
    "/manifests/M/assertion_store/c2pa.actions.v2/actions/[]/digitalSourceType",
    *(f"/manifests/M/assertion_store/c2pa.actions.v2/actions/[]/softwareAgent/{k}"
      for k in ("name", "version", "model_family", "model", "identity_method")),
    "/manifests/M/signature/alg", "/manifests/M/signature/issuer", "/manifests/M/signature/common_name",
}
# The hard binding: c2pa.hash.data (hash of the image bytes outside the manifest).
HASH_FIELDS = {"name", "alg", "hash", "pad", "exclusions/[]/start", "exclusions/[]/length"}


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg")])
def test_every_manifest_field_is_on_the_allow_list(signer, fmt, mime):
    import c2pa

    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    signed = signer.sign(image_bytes(fmt), GEN)
    with c2pa.Reader(mime, io.BytesIO(signed)) as reader:
        store = json.loads(reader.detailed_json())
    store.pop("validation_results", None)
    store.pop("validation_status", None)
    assert len(store["manifests"]) == 1
    fields = {}
    for path, value in leaves(store):
        path = re.sub(r"/manifests/urn:c2pa:[0-9a-f-]+", "/manifests/M", path)
        if path.startswith("/manifests/M/assertion_store/c2pa.hash.data/"):
            assert path.removeprefix("/manifests/M/assertion_store/c2pa.hash.data/") in HASH_FIELDS
            continue
        fields.setdefault(path, []).append(value)
    assert set(fields) <= ALLOWED_FIELDS, sorted(set(fields) - ALLOWED_FIELDS)
    agent = "/manifests/M/assertion_store/c2pa.actions.v2/actions/[]/softwareAgent/"
    assert {k.removeprefix(agent): v[0] for k, v in fields.items() if k.startswith(agent)} == GEN.software_agent()
    assert fields["/manifests/M/assertion_store/c2pa.actions.v2/actions/[]/action"] == ["c2pa.created"]
    assert fields["/manifests/M/assertion_store/c2pa.actions.v2/actions/[]/digitalSourceType"] == [
        "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"]
    when = dt.datetime.fromisoformat(fields["/manifests/M/assertion_store/c2pa.actions.v2/actions/[]/when"][0])
    assert before <= when <= dt.datetime.now(dt.timezone.utc)
    assert fields["/manifests/M/claim/claim_generator_info/name"] == [GEN.service]
    assert fields["/manifests/M/claim/instanceID"][0].startswith("xmp.iid:")   # random per image, links nothing


def test_only_the_manifest_is_added_to_the_file(signer):
    """The PNG gains exactly one chunk (caBX, the manifest store): no text chunk, no XMP."""
    data = image_bytes("PNG")
    signed = signer.sign(data, GEN)
    kinds = [c[0] for c in png_chunks(signed)]
    assert kinds.count("caBX") == 1
    assert [k for k in kinds if k != "caBX"] == [c[0] for c in png_chunks(data)]
    assert Image.open(io.BytesIO(signed)).tobytes() == Image.open(io.BytesIO(data)).tobytes()
    assert len(signed) - len(data) < 8000       # measured: ~3.4 kB (ES256, two certificates)


def strip_metadata(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    image.save(buf, image.format)
    return buf.getvalue()


STATE_CASES = [
    ("signed, dev certificate", lambda s, d: s, False, "untrusted", "signingCredential.untrusted"),
    ("signed, its CA trusted", lambda s, d: s, True, "valid", None),
    ("a pixel byte flipped", lambda s, d: flip(s, pixel_byte(s)), False, "tampered", None),
    ("a manifest byte flipped", lambda s, d: flip(s, manifest_byte(s)), False, "tampered", None),
    ("metadata stripped", lambda s, d: strip_metadata(s), False, "absent", None),
    ("never signed", lambda s, d: d, False, "absent", None),
]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("case,change,trust,state,code", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_reader_classifies(signer, dev_dir, fmt, case, change, trust, state, code):
    data = image_bytes(fmt)
    seen = change(signer.sign(data, GEN), data)
    anchors = (dev_dir / pv.DEV_CA_FILE).read_bytes() if trust else None
    report = pv.read_provenance(seen, trust_anchors=anchors)
    assert report.state == state, report
    if state in ("valid", "untrusted"):
        assert report.source_type == pv.SOURCE_TYPE
        assert report.software_agent == GEN.software_agent()
        assert report.signer == signer.subject
    if code:
        assert code in report.codes
    assert json.loads(json.dumps(report.to_json()))["state"] == state


def test_a_pixel_change_reads_as_a_data_hash_mismatch(signer):
    signed = signer.sign(image_bytes("PNG"), GEN)
    report = pv.read_provenance(flip(signed, pixel_byte(signed)))
    assert "assertion.dataHash.mismatch" in report.codes


@pytest.mark.parametrize("data", [b"", b"plain text", b"GIF89a......"], ids=["empty", "text", "gif"])
def test_not_an_image_is_an_error_not_a_state(signer, data):
    with pytest.raises(pv.ProvenanceError, match="not a PNG or JPEG"):
        pv.read_provenance(data)
    with pytest.raises(pv.ProvenanceError):
        signer.sign(data, GEN)


# --------------------------------------------------------------------------------------------------
# Signers
def test_dev_certificate_is_made_once_and_kept_private(tmp_path):
    first = pv.load_signer(None, None, tmp_path / "c2pa")
    chain = (tmp_path / "c2pa" / pv.DEV_CHAIN_FILE).read_bytes()
    second = pv.load_signer(None, None, tmp_path / "c2pa")
    assert (tmp_path / "c2pa" / pv.DEV_CHAIN_FILE).read_bytes() == chain
    assert (first.kind, second.kind, first.alg) == ("dev", "dev", "es256")
    assert (tmp_path / "c2pa" / pv.DEV_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "c2pa").iterdir() if not p.name.startswith(".")) == sorted(
        [pv.DEV_CA_FILE, pv.DEV_CHAIN_FILE, pv.DEV_KEY_FILE])      # the CA's key is never written
    warning = pv.signer_warning(first)
    assert "untrusted" in warning and "TWIN_C2PA_CERT" in warning and str(tmp_path) in warning
    assert first.status()["kind"] == "dev"


def test_dev_certificate_made_concurrently_is_one_certificate(tmp_path):
    chains = []

    def make():
        chains.append(pv.ensure_dev_certificate(tmp_path / "c2pa")[0].read_bytes())

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(chains)) == 1


def test_expiring_dev_certificate_is_renewed(tmp_path):
    folder = tmp_path / "c2pa"
    folder.mkdir()
    ca, chain, key = pv.make_dev_chain(days=10)
    (folder / pv.DEV_CHAIN_FILE).write_bytes(chain)
    (folder / pv.DEV_KEY_FILE).write_bytes(key)
    signer = pv.load_signer(None, None, folder)
    assert (folder / pv.DEV_CHAIN_FILE).read_bytes() != chain
    assert signer.expires - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=600)


def write_pair(folder: Path, leaf_key=None, password: bytes | None = None) -> tuple[Path, Path, bytes]:
    from cryptography.hazmat.primitives import serialization

    ca, chain, key = pv.make_dev_chain(common_name="Example Studio signer", leaf_key=leaf_key)
    if password:
        private = serialization.load_pem_private_key(key, None)
        key = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(password))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chain.pem").write_bytes(chain)
    (folder / "key.pem").write_bytes(key)
    return folder / "chain.pem", folder / "key.pem", ca


@pytest.mark.parametrize("key_kind,alg", [("ec", "es256"), ("rsa", "ps256")])
def test_configured_certificate_signs_and_reads_valid_under_its_ca(tmp_path, key_kind, alg):
    from cryptography.hazmat.primitives.asymmetric import rsa

    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if key_kind == "rsa" else None
    cert, key, ca = write_pair(tmp_path / "operator", leaf_key)
    signer = pv.load_signer(cert, key, tmp_path / "c2pa")
    assert (signer.kind, signer.alg, signer.subject) == ("configured", alg, "Example Studio signer")
    assert pv.signer_warning(signer) is None
    assert not (tmp_path / "c2pa").exists()                    # no development CA when one is configured
    signed = signer.sign(image_bytes("PNG"), GEN)
    assert pv.read_provenance(signed).state == "untrusted"     # no trust list given
    assert pv.read_provenance(signed, trust_anchors=ca).state == "valid"


def test_bad_configured_certificates_stop_start_up_with_the_reason(tmp_path):
    cert, key, _ = write_pair(tmp_path / "a")
    other_cert, other_key, _ = write_pair(tmp_path / "b")
    enc_cert, enc_key, _ = write_pair(tmp_path / "c", password=b"secret")
    (tmp_path / "garbage.pem").write_text("not a certificate")
    cases = [
        ((cert, None), "set together"),
        ((tmp_path / "absent.pem", key), "cannot be read"),
        ((tmp_path / "garbage.pem", key), "not a PEM certificate chain"),
        ((cert, tmp_path / "garbage.pem"), "not a PEM private key"),
        ((cert, other_key), "does not belong to the first certificate"),
        ((enc_cert, enc_key), "encrypted"),
    ]
    for (c, k), message in cases:
        with pytest.raises(ConfigError, match=message):
            pv.load_signer(c, k, tmp_path / "c2pa")


def test_certificate_without_the_c2pa_usages_is_refused(tmp_path):
    """A TLS server certificate (EKU serverAuth only) is not a C2PA signer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.org")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "tls.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="extended key usage must name one of"):
        pv.load_signer(tmp_path / "tls.pem", tmp_path / "tls.key", tmp_path / "c2pa")


def test_settings_want_both_or_neither(tmp_path):
    with pytest.raises(ConfigError, match="TWIN_C2PA_CERT is set but TWIN_C2PA_KEY is not"):
        Settings.from_env({"TWIN_C2PA_CERT": str(tmp_path / "c.pem")})
    with pytest.raises(ConfigError, match="TWIN_C2PA_KEY is set but TWIN_C2PA_CERT is not"):
        Settings.from_env({"TWIN_C2PA_KEY": str(tmp_path / "k.pem")})
    s = Settings(data_dir=tmp_path)
    assert s.c2pa_dev_dir == tmp_path / "c2pa" and s.c2pa_cert is None


def test_signing_from_many_threads(signer):
    data = image_bytes("PNG", (96, 96))
    results: list[str] = []

    def work():
        for _ in range(3):
            results.append(pv.read_provenance(signer.sign(data, GEN)).state)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["untrusted"] * 18


@pytest.mark.parametrize("field,value", [("service", ""), ("model", "a\nb"), ("identity_method", "x" * 201),
                                         ("version", None)])
def test_generator_fields_are_short_printable_names(field, value):
    kw = GEN.__dict__ | {field: value}
    with pytest.raises(ValueError, match=f"Generator.{field}"):
        pv.Generator(**kw)


def test_creation_time_must_carry_a_zone():
    with pytest.raises(ValueError, match="timezone"):
        pv.manifest_definition(GEN, dt.datetime(2026, 1, 1))


# --------------------------------------------------------------------------------------------------
# What `generate_twin.py provenance FILE…` prints (utils/safety/inspection.py)
def _marked_png(size=(512, 640)) -> bytes:
    from utils.safety import watermark as wm

    buf = io.BytesIO()
    wm.embed(photos.astronaut().resize(size)).save(buf, "PNG")
    return buf.getvalue()


def repaint(signed: bytes) -> bytes:
    """The signed PNG with one pixel painted over: new IDAT data (a valid PNG), the manifest chunk kept."""
    image = Image.open(io.BytesIO(signed)).convert("RGB")
    image.putpixel((0, 0), (255, 0, 255))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    fresh = buf.getvalue()
    new_idat = b"".join(fresh[start - 8:start + length + 4] for kind, start, length in png_chunks(fresh) if kind == "IDAT")
    out, done = [signed[:8]], False
    for kind, start, length in png_chunks(signed):
        if kind == "IDAT":
            out.append(b"" if done else new_idat)
            done = True
        else:
            out.append(signed[start - 8:start + length + 4])
    return b"".join(out)


INSPECT_CASES = [
    ("signed and marked", lambda s: s.sign(_marked_png(), GEN), 0,
     ["manifest untrusted (signingCredential.untrusted)", "source trainedAlgorithmicMedia",
      "by digital-twin-generator 1.4.0 (sdxl: stabilityai/stable-diffusion-xl-base-1.0, identity plus-face)",
      "watermark present (48/48 bits)"]),
    ("metadata stripped", lambda s: strip_metadata(s.sign(_marked_png(), GEN)), 0,
     ["manifest absent", "watermark present (48/48 bits)"]),
    ("pixels changed, manifest and mark kept", lambda s: repaint(s.sign(_marked_png(), GEN)), 0,
     ["manifest tampered (", "assertion.dataHash.mismatch", "watermark present"]),
    ("a byte of the pixels flipped", lambda s: (lambda d: flip(d, pixel_byte(d)))(s.sign(_marked_png(), GEN)), 2,
     ["manifest tampered; the pixels do not decode"]),
    ("signed thumbnail, too small for a mark", lambda s: s.sign(image_bytes("JPEG", (176, 256)), GEN), 0,
     ["manifest untrusted", "watermark: image too small to carry one"]),
    ("a plain photo", lambda s: image_bytes("PNG", (512, 640)), 1, ["manifest absent", "watermark absent"]),
    ("a text file", lambda s: b"hello", 2, ["not a PNG or JPEG image"]),
]


@pytest.mark.parametrize("case,make,code,parts", INSPECT_CASES, ids=[c[0] for c in INSPECT_CASES])
def test_inspection_line_and_exit_code(signer, case, make, code, parts):
    from utils.safety.inspection import exit_code, inspect_image

    result = inspect_image(make(signer))
    line = result.line("avatar_001.png")
    assert line.startswith("avatar_001.png: ")
    for part in parts:
        assert part in line, line
    assert exit_code([result]) == code
    json.dumps(result.to_json())
