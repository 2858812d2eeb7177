"""C2PA Content Credentials: every image the service writes says, in a signed manifest, that it is AI-made.

``load_signer(cert, key, dev_dir)`` gives a ``ContentSigner``: from the operator's PEM chain + key
(TWIN_C2PA_CERT / TWIN_C2PA_KEY: ES256 for an EC P-256 key, ES384 for P-384, PS256 for RSA), or, without
them, from a development CA + signing certificate made once in ``dev_dir`` (``<data_dir>/c2pa``) with
``cryptography``. ``signer_warning(signer)`` is the one loud start-up line for the development case:
C2PA readers show such outputs as "untrusted" until a real certificate is set.

``signer.sign(data, generator)`` returns the PNG or JPEG bytes with a manifest holding exactly one
``c2pa.actions.v2`` assertion: a ``c2pa.created`` action with IPTC digitalSourceType
``trainedAlgorithmicMedia``, the time, and the software agent (service name and version, model family
and name, identity method: a ``Generator`` the caller fills). Nothing else goes in: no ingredient (the
selfies are biometric data), no thumbnail, no session or job id. tests/test_provenance.py reads every
field of the manifest back against an allow-list.

``read_provenance(data)`` classifies a file: ``valid`` (signature and chain to a trust anchor),
``untrusted`` (intact and signed, by a certificate no anchor vouches for: the development signer, or a
real one when no trust list is given), ``tampered`` (the image or the manifest changed after signing),
``absent`` (no manifest: never signed, or metadata stripped; the invisible watermark still tells).
"""
from __future__ import annotations

import datetime as dt
import fcntl
import io
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import ConfigError

IPTC_PREFIX = "http://cv.iptc.org/newscodes/digitalsourcetype/"
SOURCE_TYPE = "trainedAlgorithmicMedia"
STATES = ("valid", "untrusted", "tampered", "absent")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# Extended key usages a C2PA signing certificate may carry (C2PA 2.x trust model; c2pa-rs's defaults).
_C2PA_EKUS = {"1.3.6.1.5.5.7.3.4": "emailProtection", "1.3.6.1.5.5.7.3.36": "documentSigning",
              "1.3.6.1.4.1.62558.2.1": "c2pa claim signing", "1.3.6.1.5.5.7.3.8": "timeStamping"}
DEV_CA_FILE, DEV_CHAIN_FILE, DEV_KEY_FILE = "dev-ca.pem", "dev-chain.pem", "dev-signer.key"
_DEV_RENEW_DAYS = 30          # a development signer this close to expiry is made anew
_READ_SETTINGS = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
_SIGN_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}, **_READ_SETTINGS}
_TEXT_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")


class ProvenanceError(ValueError):
    """The bytes are not a PNG or JPEG image, so there is no place a manifest could be."""


def sniff_mime(data: bytes) -> str:
    if data.startswith(PNG_MAGIC):
        return "image/png"
    if data.startswith(JPEG_MAGIC):
        return "image/jpeg"
    raise ProvenanceError("not a PNG or JPEG image (Content Credentials are read from those two formats)")


@dataclass(frozen=True)
class Generator:
    """What made the image, as the manifest's software agent says it. Plain names only."""
    service: str
    version: str
    model_family: str         # sdxl | flux | tiny ...
    model: str                # the base model's name (hub id or checkpoint name)
    identity_method: str      # plus-face | faceid | instantid | ...

    def __post_init__(self) -> None:
        for name in ("service", "version", "model_family", "model", "identity_method"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _TEXT_RE.match(value):
                raise ValueError(f"Generator.{name}={value!r} must be 1-200 printable characters")

    def software_agent(self) -> dict[str, str]:
        return {"name": self.service, "version": self.version, "model_family": self.model_family,
                "model": self.model, "identity_method": self.identity_method}


def manifest_definition(generator: Generator, when: dt.datetime) -> dict[str, Any]:
    """The whole manifest the service signs: this and nothing more."""
    if when.tzinfo is None:
        raise ValueError("the creation time must be timezone-aware (UTC)")
    stamp = when.astimezone(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return {
        "claim_generator_info": [{"name": generator.service, "version": generator.version}],
        "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": [{
            "action": "c2pa.created",
            "digitalSourceType": IPTC_PREFIX + SOURCE_TYPE,
            "softwareAgent": generator.software_agent(),
            "when": stamp,
        }]}}],
    }


# --------------------------------------------------------------------------------------------------
# Signing
@dataclass
class ContentSigner:
    """Signs image bytes in memory. Thread-safe; build it in the process that signs (after a fork)."""
    kind: str                     # "configured" (TWIN_C2PA_CERT) | "dev" (made under dev_dir)
    alg: str                      # es256 | es384 | ps256
    chain_path: Path
    subject: str
    issuer: str
    expires: dt.datetime
    _chain: bytes = field(repr=False, default=b"")
    _key: bytes = field(repr=False, default=b"")
    _lock: threading.Lock = field(repr=False, default_factory=threading.Lock)
    _native: Any = field(repr=False, default=None)

    def _objects(self):
        import c2pa

        if self._native is None:
            info = c2pa.C2paSignerInfo(alg=self.alg.encode(), sign_cert=self._chain, private_key=self._key, ta_url=None)
            self._native = (c2pa.Signer.from_info(info), c2pa.Context.from_dict(_SIGN_SETTINGS))
        return self._native

    def sign(self, data: bytes, generator: Generator, *, when: dt.datetime | None = None) -> bytes:
        """``data`` (PNG or JPEG bytes) with the manifest embedded; the pixels are unchanged."""
        import c2pa

        mime = sniff_mime(data)
        definition = json.dumps(manifest_definition(generator, when or dt.datetime.now(dt.timezone.utc)))
        out = io.BytesIO()
        with self._lock:
            signer, context = self._objects()
            with c2pa.Builder(definition, context=context) as builder:
                builder.sign(signer, mime, io.BytesIO(data), out)
        return out.getvalue()

    def status(self) -> dict[str, Any]:
        """For /system-status: who signs, and whether readers will trust it."""
        return {"kind": self.kind, "alg": self.alg, "subject": self.subject, "issuer": self.issuer,
                "expires": self.expires.isoformat(), "certificate": str(self.chain_path),
                "trusted_by_readers": "depends on the issuing CA" if self.kind == "configured" else "no (development CA)"}


def signer_warning(signer: ContentSigner) -> str | None:
    """The loud start-up line when outputs are signed by the development CA; None for a configured one."""
    if signer.kind != "dev":
        return None
    return ("C2PA: no TWIN_C2PA_CERT / TWIN_C2PA_KEY set: every image is signed by a DEVELOPMENT certificate "
            f"({signer.chain_path}); Content Credentials readers will show it as 'untrusted' until a "
            "certificate from a CA on the C2PA trust list is set (docs/SAFETY.md, 'Installing a certificate')")


def load_signer(cert: Path | None, key: Path | None, dev_dir: Path) -> ContentSigner:
    """The configured signer when both files are given, else the development one (made once in dev_dir).
    Every problem is a ConfigError naming the setting and the file; a test signature proves the pair."""
    if (cert is None) != (key is None):
        raise ConfigError("TWIN_C2PA_CERT and TWIN_C2PA_KEY must be set together (or neither)")
    if cert is None:
        cert, key = ensure_dev_certificate(Path(dev_dir))
        kind = "dev"
    else:
        kind = "configured"
    chain_pem = _read(Path(cert), "TWIN_C2PA_CERT")
    key_pem = _read(Path(key), "TWIN_C2PA_KEY")
    signer = _build_signer(kind, Path(cert), chain_pem, key_pem)
    try:
        signer.sign(_probe_png(), Generator("probe", "0", "probe", "probe", "probe"))
    except Exception as exc:  # c2pa refuses the pair: say so at start-up, not on the first job
        raise ConfigError(f"TWIN_C2PA_CERT={cert}: c2pa could not sign with this certificate and key "
                          f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return signer


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}={path}: cannot be read ({exc.strerror or exc})") from None


def _build_signer(kind: str, cert_path: Path, chain_pem: bytes, key_pem: bytes) -> ContentSigner:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise ConfigError(f"TWIN_C2PA_CERT={cert_path}: not a PEM certificate chain") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError("TWIN_C2PA_KEY: the key is encrypted; give an unencrypted PEM key "
                          "(openssl pkey -in key.pem -out plain.pem)") from None
    except ValueError:
        raise ConfigError("TWIN_C2PA_KEY: not a PEM private key") from None
    leaf = chain[0]
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*raw) != leaf.public_key().public_bytes(*raw):
        raise ConfigError(f"TWIN_C2PA_KEY does not belong to the first certificate in TWIN_C2PA_CERT={cert_path} "
                          "(the signing certificate must come first in the chain)")
    _check_leaf(leaf, cert_path)
    return ContentSigner(kind=kind, alg=_alg_for(private, cert_path), chain_path=cert_path,
                         subject=_common_name(leaf.subject), issuer=_common_name(leaf.issuer),
                         expires=leaf.not_valid_after_utc, _chain=chain_pem, _key=key_pem)


def _alg_for(private: Any, cert_path: Path) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(private, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": "es256", "secp384r1": "es384"}
        if private.curve.name in algs:
            return algs[private.curve.name]
        raise ConfigError(f"TWIN_C2PA_CERT={cert_path}: EC curve {private.curve.name} is not supported "
                          "(P-256 for ES256 or P-384 for ES384)")
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < 2048:
            raise ConfigError(f"TWIN_C2PA_CERT={cert_path}: RSA key of {private.key_size} bits; PS256 needs at least 2048")
        return "ps256"
    raise ConfigError(f"TWIN_C2PA_CERT={cert_path}: key type {type(private).__name__} is not supported "
                      "(EC P-256 for ES256, EC P-384 for ES384, RSA for PS256)")


def _check_leaf(leaf: Any, cert_path: Path) -> None:
    """The C2PA certificate profile rules a reader applies, checked here so a bad certificate stops
    start-up with the reason instead of producing manifests every reader rejects."""
    from cryptography import x509

    now = dt.datetime.now(dt.timezone.utc)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise ConfigError(f"TWIN_C2PA_CERT={cert_path}: the signing certificate is valid from "
                          f"{leaf.not_valid_before_utc:%Y-%m-%d} to {leaf.not_valid_after_utc:%Y-%m-%d}, not now")
    found = {}
    for name, kind in (("key usage", x509.KeyUsage), ("extended key usage", x509.ExtendedKeyUsage)):
        try:
            found[name] = leaf.extensions.get_extension_for_class(kind).value
        except x509.ExtensionNotFound:
            raise ConfigError(f"TWIN_C2PA_CERT={cert_path}: the signing certificate has no {name} extension; "
                              "C2PA requires one") from None
    usage = found["key usage"]
    ekus = {e.dotted_string for e in found["extended key usage"]}
    if not usage.digital_signature:
        raise ConfigError(f"TWIN_C2PA_CERT={cert_path}: the signing certificate's key usage lacks digitalSignature")
    if "2.5.29.37.0" in ekus or not ekus & set(_C2PA_EKUS):
        raise ConfigError(f"TWIN_C2PA_CERT={cert_path}: the signing certificate's extended key usage must name "
                          f"one of {', '.join(sorted(set(_C2PA_EKUS.values())))} (and not anyExtendedKeyUsage)")


def _common_name(name: Any) -> str:
    from cryptography.x509.oid import NameOID

    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else name.rfc4514_string()


def _probe_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# The development CA
def ensure_dev_certificate(folder: Path) -> tuple[Path, Path]:
    """(chain, key) of the development signer in ``folder``, made once (and again when it nears expiry).
    Safe when several processes start at once: the first makes it under a lock, the others reuse it.
    The CA's own key is never written: nothing else is ever signed with it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chain, key = folder / DEV_CHAIN_FILE, folder / DEV_KEY_FILE
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _dev_current(chain, key):
            ca_pem, chain_pem, key_pem = make_dev_chain()
            _write_private(key, key_pem)
            _write_atomic(folder / DEV_CA_FILE, ca_pem)
            _write_atomic(chain, chain_pem)
    return chain, key


def _dev_current(chain: Path, key: Path) -> bool:
    from cryptography import x509

    if not (chain.is_file() and key.is_file()):
        return False
    try:
        leaf = x509.load_pem_x509_certificates(chain.read_bytes())[0]
    except ValueError:
        return False
    left = leaf.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    return left > dt.timedelta(days=_DEV_RENEW_DAYS)


def make_dev_chain(*, days: int = 730, common_name: str = "Digital Twin Generator development signer",
                   leaf_key: Any = None) -> tuple[bytes, bytes, bytes]:
    """(CA certificate, signing chain = leaf + CA, leaf key) as PEM: an EC P-256 CA and a leaf (EC P-256,
    or ``leaf_key``) with the key usage (digitalSignature) and extended key usage (emailProtection) C2PA
    asks of a signer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = leaf_key or ec.generate_private_key(ec.SECP256R1())
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Digital Twin Generator (development, untrusted)")
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Digital Twin Generator development CA"), org])
    no_usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + dt.timedelta(days=days + 365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **no_usage), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name), org]))
            .issuer_name(ca_name).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **no_usage), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_pem = ca.public_bytes(pem)
    key_pem = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca_pem, leaf.public_bytes(pem) + ca_pem, key_pem


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_private(path: Path, data: bytes) -> None:
    _write_atomic(path, data, mode=0o600)


# --------------------------------------------------------------------------------------------------
# Reading
@dataclass(frozen=True)
class ProvenanceReport:
    state: str                              # valid | untrusted | tampered | absent
    source_type: str | None = None          # e.g. trainedAlgorithmicMedia (IPTC code, prefix removed)
    software_agent: dict[str, Any] | None = None
    signer: str | None = None               # the signing certificate's common name
    codes: tuple[str, ...] = ()             # the validation failure codes (why untrusted / tampered)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "source_type": self.source_type, "software_agent": self.software_agent,
                "signer": self.signer, "codes": list(self.codes)}


def read_provenance(data: bytes, *, trust_anchors: bytes | None = None) -> ProvenanceReport:
    """Classify ``data`` (PNG or JPEG bytes; ProvenanceError otherwise). ``trust_anchors``: PEM CA
    certificates to trust (e.g. the C2PA trust list); without any, an intact manifest reads ``untrusted``.
    Never touches the network (remote manifests and OCSP are off)."""
    import c2pa

    mime = sniff_mime(data)
    settings: dict[str, Any] = json.loads(json.dumps(_READ_SETTINGS))
    if trust_anchors:
        settings["trust"] = {"trust_anchors": trust_anchors.decode("ascii")}
    try:
        with c2pa.Reader(mime, io.BytesIO(data), context=c2pa.Context.from_dict(settings)) as reader:
            validation = reader.get_validation_state()
            store = json.loads(reader.json())
    except c2pa.C2paError.ManifestNotFound:
        return ProvenanceReport("absent")
    except c2pa.C2paError.RemoteManifest:  # only a link to a manifest elsewhere: never fetched from here
        return ProvenanceReport("absent", codes=("manifest.remote.notFetched",))
    except c2pa.C2paError as exc:  # a manifest is there but does not parse: changed after signing
        return ProvenanceReport("tampered", codes=(type(exc).__name__.lstrip("_"),))
    return _report(validation, store)


def _report(validation: str | None, store: dict[str, Any]) -> ProvenanceReport:
    active = store.get("manifests", {}).get(store.get("active_manifest") or "", {})
    created = next((a for assertion in active.get("assertions", []) if assertion.get("label", "").startswith("c2pa.actions")
                    for a in assertion.get("data", {}).get("actions", []) if a.get("action") == "c2pa.created"), {})
    source = created.get("digitalSourceType")
    failures = tuple(sorted({s.get("code", "") for s in store.get("validation_status") or []}))
    state = {"Trusted": "valid", "Valid": "untrusted"}.get(validation or "", "tampered")
    return ProvenanceReport(state, source_type=source.removeprefix(IPTC_PREFIX) if source else None,
                            software_agent=created.get("softwareAgent"),
                            signer=(active.get("signature_info") or {}).get("common_name"), codes=failures)
