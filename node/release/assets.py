"""Federation assets at a site (docs/DESIGN.md 3.4): the CVAE route's pinned feature-extractor
weights, fetched from the coordinator's exchange into the site's local model store, so a site
without internet needs no model hub.

The weights land in `common.modelstore.default_store_dir(ws.root)` under the name the pin gives
(`extractor.weights`), only after their full sha256 matched the pin (`extractor.sha256`): the
exchange streams them into a temporary file in the store folder, which is deleted if the bytes
differ and renamed into place otherwise (node.release.exchange_client.ExchangeClient.fetch_asset).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from common.config import ExtractorConfig
from common.modelstore import ModelStoreError, default_store_dir, resolve
from node.release.exchange_client import ExchangeClient, site_client


def fetch_extractor_weights(
    ws, cfg: ExtractorConfig, *, client: ExchangeClient | None = None, say: Callable[[str], None] | None = None
) -> Path | None:
    """The path of extractor `cfg`'s weights in the site's model store, fetched from the coordinator
    if they are not there yet. None for arch "tiny" (no weight file; nothing is fetched).

    A file already in the store that matches the pin is used as it is, without contacting the
    coordinator; one that does not match raises ModelStoreError and is left for the operator.
    A download whose bytes do not match the pin raises ExchangeError (code DATA_LOSS) naming the
    file and both digests, and leaves nothing in the store. client: by default the site's own
    (site.yaml's coordinator, mutual TLS with the kit's certificate).
    """
    if cfg.arch == "tiny":
        return None
    name, pin = cfg.weights, cfg.sha256.lower()
    if Path(name).name != name or name in (".", ".."):
        raise ValueError(f"extractor.weights {name!r} must be a plain file name in the model store, not a path")
    store = default_store_dir(ws.root)
    path = store / name
    if path.exists() or path.is_symlink():
        try:
            return resolve(pin, store_dir=store, name=name)
        except ModelStoreError as e:
            raise ModelStoreError(
                f"{e}; or remove it and run `plan-node fetch-assets` to get the federation's copy from the coordinator"
            ) from None
    own = client is None
    if own:
        client = site_client(ws)
    try:
        got = client.fetch_asset(pin, path)
    finally:
        if own:
            client.close()
    if say is not None:
        say(f"extractor weights {name} ({got['size']} bytes, sha256 {pin}) fetched from the coordinator into {store}")
    return resolve(pin, store_dir=store, name=name)
