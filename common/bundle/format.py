"""The bundle format (docs/DESIGN.md 3.6): its layout, names and limits, its error, and what verification returns.

A bundle directory `<bundle_id>/` holds

    bag/                          a BagIt bag (RFC 8493, bagit package, sha256 manifests)
      bagit.txt, bag-info.txt, manifest-sha256.txt, tagmanifest-sha256.txt
      audit.json                  tag file: the audit result (the same dict is in the attestation)
      datacard.json               tag file: site, route, data_format, counts, created_at, code version,
                                  config digest, and image_shape or embedding_dim
      data/                       the payload, in one of two layouts (told apart by what it holds):
        PLAN route: images, data_format "png-grey8"
          labels.csv              `file,label`, file relative to data/, e.g. images/1/3.png
          images/<class>/<i>.png  grey 8-bit PNG, <i> the sample's row in labels.csv
        CVAE route: embeddings, data_format "safetensors-float32"
          embeddings.safetensors  exactly one tensor, "embeddings", F32 [N,D]: a foundation-model
                                  feature extractor's synthetic feature vectors
          labels.csv              `index,label`, one row per embedding, index 0..N-1 in order
    attestation.dsse.json         DSSE envelope of an in-toto Statement v1 whose subject is
                                  bag/tagmanifest-sha256.txt, signed with the site's Ed25519 key;
                                  its predicate names the route

and travels as one uncompressed tar of exactly those regular files (paths relative to the bundle
directory). The tag manifest covers every tag file and, through manifest-sha256.txt, every
payload file, so the one signature covers the whole bag.

bundle_id: the first 32 hex digits of sha256("plan-node-bundle-v1", site, shape, images, labels)
for images, of sha256("plan-node-bundle-embeddings-v1", site, dtype and shape, embeddings, labels)
for embeddings: the same accepted set from the same site always gets the same id, so the
coordinator's replay check also catches a set published twice.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from common import errors

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://plan-node.dev/synthetic-release/v1"
TAGMANIFEST = "tagmanifest-sha256.txt"
ATTESTATION = "attestation.dsse.json"
BAG = "bag"

# Every file a bag may hold outside data/: anything else is refused (BagIt allows more; we do not).
TAG_FILES = ("bagit.txt", "bag-info.txt", "manifest-sha256.txt", TAGMANIFEST, "audit.json", "datacard.json")

# ASCII digits only: str patterns' \d would also take other scripts' digits.
_PAYLOAD_FILE = re.compile(r"^images/(\d{1,2})/(\d{1,9})\.png$", re.ASCII)
BUNDLE_ID = re.compile(r"[0-9a-f]{32}")  # fullmatch: a bundle id, the name of its folder and object
MAX_IMAGE_SIDE = 4096  # pixels; a decoded PNG larger than this is refused (decompression bombs)
MAX_JSON_BYTES = 16 * 1024 * 1024  # attestation and tag files are read whole; bound them
MAX_ATTESTATION_BYTES = 1024 * 1024  # the signed statement, read and verified before any other member
MAX_SIGNATURES = 4  # signatures an attestation may carry: each costs a verification
MAX_MEMBERS = 200_000  # archive members a bundle tar may hold
EMBEDDINGS = "embeddings.safetensors"  # the CVAE route's payload file in data/, beside labels.csv
EMBEDDINGS_TENSOR = "embeddings"  # the one tensor it holds

# The safetensors header is JSON read whole before anything else; ours is ~80 bytes.
MAX_SAFETENSORS_HEADER = 1024 * 1024
DATA_FORMATS = {"plan": "png-grey8", "cvae": "safetensors-float32"}  # route -> datacard.data_format
_LABEL = re.compile(r"0|[1-9][0-9]?")  # a class index 0..99, canonical decimal (fullmatch)
_DATA = f"{BAG}/data/"  # the payload's folder, as member paths start

# The files the checks parse whole, kept as they stream past (see _Members).
_KEPT = frozenset([ATTESTATION, *(f"{BAG}/{t}" for t in TAG_FILES), f"{_DATA}labels.csv"])

# A kept file up to this size stays in memory; a larger one (labels.csv or the manifest of very
# many samples: they grow with the sample count) goes to a temporary file, so memory stays bounded.
KEEP_IN_MEMORY = 16 * 1024 * 1024
_PNG_HEAD = 24  # bytes of a PNG that its header check reads: signature, IHDR length and type, width, height
_BLOCK = 1 << 20  # bytes read at a time from an archive member


class BundleError(ValueError):
    """A bundle is malformed, unsafe, untrusted, too large, or fails policy.

    `reason` is one of "invalid", "unsafe", "untrusted", "too_large", "policy" so a server can
    map it to a status code; the message names the file, field or value at fault.
    """

    exit_code = errors.VERIFY

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed `verify_bundle`, extracted at `dir` (holding bag/ and the attestation),
    or `verify_bundle_stream` (dir None: nothing was extracted).

    route: "plan" (the payload is images) or "cvae" (embeddings), as the payload, the signed
    predicate and the data card all agree. datacard: bag/datacard.json's content (checked
    against the signed predicate: site, bundle_id, route, n_samples).
    """

    dir: Path | None
    site: str
    bundle_id: str
    sequence: int
    statement: dict
    n_samples: int
    key_id: str = ""  # the registered key that verified the signature
    route: str = "plan"
    datacard: dict = dataclasses.field(default_factory=dict)

    @property
    def predicate(self) -> dict:
        return self.statement["predicate"]
