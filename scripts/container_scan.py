"""Scan every layer of an image for secrets and weights (scripts/container_test.sh; issue 28).

    podman save --format docker-archive IMAGE | python scripts/container_scan.py --ca-bundle HOST_BUNDLE -

Reads the archive as a stream (nothing is unpacked to disk) and looks at every regular file of every
layer, so a file added in one layer and deleted in a later one is still found. Fails (exit 1) on:
- a private key (PEM) or a token of a known shape (Hugging Face, GitHub, AWS access key, a filled-in
  TWIN_API_KEYS / TWIN_ADMIN_KEYS / TWIN_WEBHOOK_SECRET line);
- the host's CA bundle: a file equal to it, or holding any certificate of it that is not a public CA
  (public: in a --public-bundle; default certifi's list and the distribution's store, /usr/share/
  ca-certificates): what is left is what the host added, e.g. its TLS-inspecting proxy's CA;
- weights or runtime data: any file under the volume folders (/data, /models, /cache) or a weight file
  (.safetensors .ckpt .pt .pth .onnx .gguf) outside the virtualenv (packages ship their own test models).
A file that the distribution's package manager installed and recorded (dpkg's md5sums, same checksum) is
the distribution's, not the build's: its findings are listed but do not fail (GnuTLS carries its FIPS
self-test keys). Prints what it found (path, layer, kind; never the secret itself) and the bytes scanned.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
import tarfile
from pathlib import Path

CHUNK = 16 << 20
OVERLAP = 4096
TOKEN_RE = re.compile(
    # a PEM header followed by a key body (libraries hold the bare header string as a parser constant)
    rb"(?P<private_key>-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----\r?\n"
    rb"(?:[\w-]+: [^\n]*\n)*\s*[A-Za-z0-9+/]{40,})"
    rb"|(?P<hugging_face_token>\bhf_[A-Za-z]{34}\b)"
    rb"|(?P<github_token>\bgh[pousr]_[A-Za-z0-9]{36}\b)"
    # AWS's documentation placeholders end in EXAMPLE (AKIAIOSFODNN7EXAMPLE, in boto3's and botocore's
    # packaged examples); they open no account, so they are not findings.
    rb"|(?P<aws_access_key>\bAKIA(?![0-9A-Z]{9}EXAMPLE\b)[0-9A-Z]{16}\b)"
    rb"|(?P<service_key_setting>\bTWIN_(?:API_KEYS|ADMIN_KEYS|WEBHOOK_SECRET)=[A-Za-z0-9+/_-]{16,})")
# Cheap substring tests first: the regex runs only on chunks that hold one of these.
PREFILTER = (b"PRIVATE KEY-----", b"hf_", b"hp_", b"ho_", b"hu_", b"hs_", b"hr_", b"AKIA", b"TWIN_")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".onnx", ".gguf")
VOLUME_DIRS = ("data/", "models/", "cache/")
VENV = "opt/venv/"
PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


def certificates(pem: bytes) -> dict[bytes, bytes]:
    """DER sha256 -> DER of every certificate in a PEM bundle."""
    out = {}
    for body in PEM_RE.findall(pem):
        der = base64.b64decode(b"".join(body.split()))
        out[hashlib.sha256(der).digest()] = der
    return out


def needles(host_only: dict[bytes, bytes]) -> list[bytes]:
    """Byte strings that betray a certificate in a file: one whole 64-character line of its standard PEM
    wrapping (from the middle, inside the public key) and 48 bytes of its DER from the same place."""
    out = []
    for der in host_only.values():
        b64 = base64.b64encode(der)
        lines = [b64[i:i + 64] for i in range(0, len(b64) - 64, 64)]
        out.append(lines[len(lines) // 2])
        out.append(der[len(der) // 2:len(der) // 2 + 48])
    return out


class Scanner:
    def __init__(self, ca_bundle: bytes, public: dict[bytes, bytes]):
        self.bundle_sha = hashlib.sha256(ca_bundle).digest()
        self.bundle_len = len(ca_bundle)
        self.host_only = {k: v for k, v in certificates(ca_bundle).items() if k not in public}
        self.needles = needles(self.host_only)
        self.findings: list[tuple[str, str, str, str]] = []   # path, layer, kind, md5
        self.dpkg: set[tuple[str, str]] = set()               # (path, md5) recorded by dpkg
        self.files = 0
        self.bytes = 0

    def scan_file(self, layer: str, name: str, f, size: int) -> None:
        self.files += 1
        path = name.lstrip("./")
        kinds: set[str] = set()
        if path.startswith(VOLUME_DIRS):
            kinds.add("a file in a volume folder (weights or runtime data)")
        elif path.endswith(WEIGHT_SUFFIXES) and not path.startswith(VENV):
            kinds.add("a weight file")
        whole = hashlib.sha256() if size == self.bundle_len else None
        md5 = hashlib.md5()
        dpkg_list = path.startswith("var/lib/dpkg/info/") and path.endswith(".md5sums")
        listed = b""
        tail = b""
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            self.bytes += len(chunk)
            md5.update(chunk)
            if whole is not None:
                whole.update(chunk)
            if dpkg_list:
                listed += chunk
            data = tail + chunk
            if any(p in data for p in PREFILTER):
                kinds.update(m.lastgroup.replace("_", " ") for m in TOKEN_RE.finditer(data))
            if any(n in data for n in self.needles):
                kinds.add("a certificate of the host's CA bundle that is not a public CA")
            tail = data[-OVERLAP:]
        if whole is not None and whole.digest() == self.bundle_sha and self.host_only:
            kinds.add("the host's CA bundle (byte for byte)")
        for line in listed.decode("utf-8", "replace").splitlines():
            digest, _, listed_path = line.partition("  ")
            self.dpkg.add((listed_path.strip(), digest))
        self.findings.extend((path, layer, k, md5.hexdigest()) for k in sorted(kinds))

    def report(self) -> tuple[list[str], list[str]]:
        """(failures, distribution files) as printable lines."""
        bad, distro = [], []
        for path, layer, kind, md5 in self.findings:
            (distro if (path, md5) in self.dpkg else bad).append(f"{path} ({layer}): {kind}")
        return bad, distro

    def scan_layer(self, layer: str, fileobj) -> None:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for m in tar:
                if m.isfile() and not Path(m.name).name.startswith(".wh."):
                    self.scan_file(layer, m.name, tar.extractfile(m), m.size)

    def scan_archive(self, fileobj) -> int:
        layers = 0
        with tarfile.open(fileobj=fileobj, mode="r|*") as outer:
            for m in outer:
                if m.isfile() and (m.name.endswith(".tar") or m.name.endswith("/layer.tar")):
                    layers += 1
                    self.scan_layer(m.name[:19], outer.extractfile(m))
        return layers


def default_public_bundles() -> list[Path]:
    """certifi's Mozilla list and the distribution's CA store: Debian's can be older or newer than
    certifi's, so a public CA is one that either holds."""
    out = [p for p in Path("/usr/share/ca-certificates").rglob("*.crt")] if Path("/usr/share/ca-certificates").is_dir() else []
    try:
        import certifi
        out.append(Path(certifi.where()))
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive", help="docker-archive tar (podman save), - for stdin")
    ap.add_argument("--ca-bundle", required=True, type=Path, help="the host's CA bundle (pip's `cert`)")
    ap.add_argument("--public-bundle", type=Path, action="append", default=None,
                    help="PEM file of public CAs (repeatable; default: certifi's and /usr/share/ca-certificates)")
    args = ap.parse_args(argv)
    public: dict[bytes, bytes] = {}
    for path in args.public_bundle or default_public_bundles():
        public.update(certificates(path.read_bytes()))
    scanner = Scanner(args.ca_bundle.read_bytes(), public)
    print(f"[scan] host CA bundle {args.ca_bundle}: {len(scanner.host_only)} certificate(s) not among "
          f"{len(public)} public CAs")
    if args.archive == "-":
        layers = scanner.scan_archive(sys.stdin.buffer)
    else:
        with open(args.archive, "rb") as f:
            layers = scanner.scan_archive(f)
    print(f"[scan] {layers} layer(s), {scanner.files} files, {scanner.bytes / 1e9:.2f} GB scanned")
    if not layers:
        print("[scan] FAIL: no layer found in the archive")
        return 1
    bad, distro = scanner.report()
    for line in distro:
        print(f"[scan] distribution package file, checksum as dpkg recorded it (not a failure): {line}")
    for line in bad:
        print(f"[scan] FOUND {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
