"""The coordinator's directory: where everything it holds lives.

Layout of the coordinator directory (`--dir`):

    federation.yaml     the federation config (quorum, ports, policy floor, downstream model)
    ca/                 the federation CA (ca.key 0600 never leaves this machine)
    tls/                the coordinator's server certificate for the exchange, the Fleet gateway and the SuperLink
    keys/               coordinator.key (0600) + .pub: signs the trust document, the pool listing and Flower Apps
    clients/            <site>.crt: the client certificate of the latest kit of each site (server.kit);
                        issued/<site>-<serial>.crt: every one issued; revoked.json: the exchange's deny-list
    trust.db            registered site signing keys
    store/              the bundle pool: content-addressed tars + SQLite index (.serving.lock: held by the exchange)
    assets/<sha256>     federation assets the exchange serves (server/assets.py), e.g. extractor weights
    superlink.db        Flower's state, so registrations and run history survive a restart
    flower_nodes/       <site>.pub: the SuperNode keys the Fleet gateway admits; revoked/: revoked sites' keys
    fab_signatures/     <sha256>.json: the coordinator's signature on each Flower App it submitted
    runs/<stamp>/       one folder per federation run: results.json, model.safetensors
                        (cvae/: the federated CVAE's run before it, when cvae_federated)
    events.jsonl        uploads accepted and refused, key rotations and revocations, runs started
                        and ended (common/eventlog.py): what the dashboard lists
    logs/               the SuperLink's log; gateway.log: the Fleet gateway's refusals

Only the Fleet gateway (server/fleet_gateway.py) listens on `superlink_host:superlink_port`; the
SuperLink itself, with its unauthenticated Control API, listens on 127.0.0.1 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config import FederationConfig, dump_yaml, load_federation_config
from common.fileio import atomic_write_text
from common.tls import certificate_names
from server.authority import init_authority
from server.trust import TrustStore


@dataclass(frozen=True)
class CoordinatorDir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "federation.yaml"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    def server_names(self) -> list[str]:
        """The names and addresses the server certificate (tls/server.crt) covers."""
        return certificate_names((self.tls_dir / "server.crt").read_bytes())

    @property
    def coordinator_key(self) -> Path:
        return self.root / "keys" / "coordinator.key"

    @property
    def coordinator_pub(self) -> Path:
        return self.root / "keys" / "coordinator.pub"

    @property
    def trust_db(self) -> Path:
        return self.root / "trust.db"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def revoked_certs(self) -> Path:
        """The client certificates the exchange refuses (server/revoked.py)."""
        return self.root / "clients" / "revoked.json"

    def issued_certs(self, site: str) -> list[Path]:
        """Every client certificate issued to `site` that is on record."""
        return sorted({*self.root.glob(f"clients/issued/{site}-*.crt"), *self.root.glob(f"clients/{site}.crt")})

    @property
    def assets(self) -> Path:
        """Federation assets by sha256 (server/assets.py); the exchange serves `assets/` beside `store/`."""
        return self.root / "assets"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def flwr_home(self) -> Path:
        return self.root / ".flwr"

    @property
    def node_keys(self) -> Path:
        """`<site>.pub`: each site's Flower SuperNode public key; `nodes.json`: node id -> site."""
        return self.root / "flower_nodes"

    @property
    def revoked_node_keys(self) -> Path:
        return self.node_keys / "revoked"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def fab_signatures(self) -> Path:
        return self.root / "fab_signatures"

    def add_node_key(self, site: str, public_key_line: str) -> None:
        path = self.node_keys / f"{site}.pub"
        if path.exists() and path.read_text().strip() != public_key_line:
            raise ValueError(f"site {site!r} already has another Flower node key ({path})")
        for revoked in self.revoked_node_keys.glob("*.pub"):
            if revoked.read_text().strip() == public_key_line:
                raise ValueError(f"that Flower node key was revoked ({revoked}); the site must make a new one")
        atomic_write_text(path, public_key_line + "\n")

    def config(self) -> FederationConfig:
        return load_federation_config(self.config_path)

    def trust(self) -> TrustStore:
        return TrustStore(self.trust_db)


def federation_for(
    *, name: str, quorum: int, min_nodes: int | None, rounds: int, hosts: list[str], bind: str
) -> FederationConfig:
    """The federation.yaml `plan-server init` writes: the exchange and the Fleet gateway listen on
    `bind`; the first of `hosts` is the address the site kits name. ValueError on a bad value."""
    return FederationConfig(
        name=name,
        quorum=quorum,
        min_nodes=min_nodes,
        downstream={"rounds": rounds},
        public_host=hosts[0] if hosts else None,
        exchange_host=bind,
        superlink_host=bind,
    )


def init_coordinator(root: Path, config: FederationConfig, *, hosts: list[str] | None = None) -> CoordinatorDir:
    """Create a coordinator directory: federation.yaml, the federation CA and the server certificate."""
    cd = CoordinatorDir(Path(root))
    if cd.config_path.exists():
        raise FileExistsError(f"{cd.config_path} already exists; refusing to overwrite a federation")
    cd.root.mkdir(parents=True, exist_ok=True)
    init_authority(cd.root, config.name, hosts=hosts)  # CA, server certificate, coordinator key
    atomic_write_text(cd.config_path, "# plan-node federation config; every key is optional.\n" + dump_yaml(config))
    return cd
