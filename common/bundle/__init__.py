"""Signed synthetic-data bundles (docs/DESIGN.md 3.6): build, pack, extract safely, verify, load.

The package's API is what this module exports; its modules, one idea each:
- format: the layout (see its docstring), names, limits, BundleError and VerifiedBundle;
- build: a bundle folder from accepted images or embeddings, signed;
- archive: packing a folder as one tar, and reading one back safely (safe_extract);
- verify: every check before use, extracted (verify_bundle) or streamed (verify_bundle_stream),
  with trust (whose key signed it), members (what the checks read of the stream), bagcheck
  (BagIt) and parsers (bounded readers of labels.csv, safetensors and PNG headers);
- load: the payload of a verified bundle.
"""

from common.bundle.archive import pack_bundle, read_bundle_site, read_predicate, safe_extract
from common.bundle.build import build_bundle, bundle_id_for, code_version, write_tagmanifest
from common.bundle.format import ATTESTATION, BUNDLE_ID, PAYLOAD_TYPE, PREDICATE_TYPE, BundleError, VerifiedBundle
from common.bundle.load import bundle_route, load_bundle_data, load_bundle_embeddings, load_bundle_images
from common.bundle.trust import key_vouches, recheck_signer
from common.bundle.verify import verify_bundle, verify_bundle_stream

__all__ = [
    "ATTESTATION",
    "BUNDLE_ID",
    "BundleError",
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "VerifiedBundle",
    "build_bundle",
    "bundle_id_for",
    "bundle_route",
    "code_version",
    "key_vouches",
    "load_bundle_data",
    "load_bundle_embeddings",
    "load_bundle_images",
    "pack_bundle",
    "read_bundle_site",
    "read_predicate",
    "recheck_signer",
    "safe_extract",
    "verify_bundle",
    "verify_bundle_stream",
    "write_tagmanifest",
]
