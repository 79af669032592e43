"""Exchange throughput on loopback: a ~200 MB signed bundle vs raw gRPC streaming of the same bytes.

    .venv/bin/python -m bench.exchange [--mb 200] [--out bench/results/exchange.json]

One mutual-TLS gRPC server on 127.0.0.1 hosts both the real Exchange service and a raw service
(generic handlers, no protobuf: the bytes only) with the same credentials, chunk size and message
limits. Measured in the same run:

    raw upload / raw download       the bytes streamed in CHUNK_BYTES messages, server discards / reads from memory
    exchange upload                 ExchangeClient.upload: stream (hashed while sent), written to incoming/ (in a
                                    thread) and verified while it arrives without extracting (verify_bundle_stream:
                                    safe member walk, signature, every digest) + fsync + sha256 check + rename + index
    exchange download               ExchangeClient.download: stream (hashed while received) + sha256 check
                                    + fsync + rename
    write + fsync                   the tar's bytes from memory to a new file in the store's incoming/, fsynced:
                                    the floor of any upload that keeps what it receives (not a baseline)
    verification                    verify_bundle alone on the same tar (extracts, as a node does), reported per GB;
                                    and verify_bundle_stream alone (extracts nothing, as the store does)

Prints a table and writes the figures as JSON, with the load average before and after: the
machine may be shared, and the figures only mean something next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from common.bundle import build_bundle, pack_bundle, verify_bundle, verify_bundle_stream
from common.config import FederationConfig
from common.keyfile import read_private_file
from common.signing import generate_signing_key, load_private_key
from common.tls import issue_client_cert
from common.wire import CHUNK_BYTES, grpc_options
from node.release.exchange_client import ExchangeClient
from server.coordinator import init_coordinator
from server.exchange import ExchangeServicer, add_exchange_to_server
from server.store import BundleStore

RAW = "plannode.bench.Raw"


def _raw_handlers(payload: bytes) -> grpc.GenericRpcHandler:
    """Raw/Up consumes byte chunks and returns their count; Raw/Down streams `payload` in chunks."""

    def up(request_iterator, context):
        n = 0
        for chunk in request_iterator:
            n += len(chunk)
        return str(n).encode()

    def down(request, context):
        view = memoryview(payload)
        for i in range(0, len(view), CHUNK_BYTES):
            yield bytes(view[i : i + CHUNK_BYTES])

    return grpc.method_handlers_generic_handler(
        RAW,
        {
            "Up": grpc.stream_unary_rpc_method_handler(up),
            "Down": grpc.unary_stream_rpc_method_handler(down),
        },
    )


def _bundle(root: Path, mb: int) -> tuple[Path, str]:
    """A signed bundle of incompressible 512x512 grey PNGs, about `mb` MB; returns (tar, site public PEM)."""
    n = max(1, int(mb * 1e6 / (512 * 512 + 1200)))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 512, 512), dtype=np.uint8)
    labels = rng.integers(0, 2, n).astype(np.int64)
    generate_signing_key(root / "site.key", root / "site.pub")
    bid = build_bundle(
        root / "out",
        images=images,
        labels=labels,
        audit={"passed": True},
        datacard={},
        site="bench",
        sequence=1,
        signing_key=load_private_key(root / "site.key"),
        config_digest="0" * 64,
    )
    return pack_bundle(root / "out" / bid), (root / "site.pub").read_text()


def _write_and_fsync(data: bytes, path: Path) -> float:
    """Seconds to write `data` to the new file `path` in CHUNK_BYTES writes and fsync it: the
    least a store that keeps what it receives must do, which raw streaming does not."""
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for i in range(0, len(data), CHUNK_BYTES):
            f.write(data[i : i + CHUNK_BYTES])
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def run(mb: int, out: Path) -> dict:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="plan-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        tar, pub = _bundle(root, mb)
        build_s = time.perf_counter() - t0
        size = tar.stat().st_size
        payload = tar.read_bytes()

        cd = init_coordinator(root / "coord", FederationConfig(name="bench", max_bundle_bytes=1 << 30))
        trust = cd.trust()
        trust.add("bench", pub)
        store = BundleStore(cd.store, max_bundle_bytes=1 << 30)
        crt, key = issue_client_cert(cd.ca_dir, root / "client", "bench")
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=grpc_options())
        add_exchange_to_server(
            ExchangeServicer(store=store, trust=trust, max_bundle_bytes=1 << 30, mutual_tls=True), server
        )
        server.add_generic_rpc_handlers((_raw_handlers(payload),))
        creds = grpc.ssl_server_credentials(
            [(read_private_file(cd.tls_dir / "server.key"), (cd.tls_dir / "server.crt").read_bytes())],
            root_certificates=cd.ca_cert.read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        address = f"127.0.0.1:{port}"
        try:
            client = ExchangeClient(address, cd.ca_cert, timeout=600, client_cert=crt, client_key=key)
            ch = client._channel  # the very same mutual-TLS channel for the raw calls
            up = ch.stream_unary(f"/{RAW}/Up")
            down = ch.unary_stream(f"/{RAW}/Down")
            client.health()  # handshake done before timing

            t0 = time.perf_counter()
            with open(tar, "rb") as f:  # read from the same file, chunk by chunk, as the exchange client does
                got = int(up(iter(lambda: f.read(CHUNK_BYTES), b""), timeout=600))
            raw_up = time.perf_counter() - t0
            assert got == size
            t0 = time.perf_counter()
            got = sum(len(c) for c in down(b"", timeout=600))
            raw_down = time.perf_counter() - t0
            assert got == size

            write_s = _write_and_fsync(payload, store.incoming / "write-floor.bin")
            t0 = time.perf_counter()
            rec = client.upload(tar, site="bench")
            ex_up = time.perf_counter() - t0
            t0 = time.perf_counter()
            client.download(rec["bundle_id"], root / "dl" / "b.tar")
            ex_down = time.perf_counter() - t0
            client.close()
        finally:
            server.stop(grace=None)

        t0 = time.perf_counter()
        vb = verify_bundle(tar, trust.windows(), max_bytes=1 << 30, dest=root / "verify")
        verify_s = time.perf_counter() - t0
        assert vb.bundle_id == rec["bundle_id"]
        t0 = time.perf_counter()
        verify_bundle_stream(tar, trust.windows(), max_bytes=1 << 30)
        verify_stream_s = time.perf_counter() - t0

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "bundle_bytes": size,
        "chunk_bytes": CHUNK_BYTES,
        "n_images": vb.n_samples,
        "build_s": round(build_s, 2),
        "raw_upload_MBps": round(_rate(size, raw_up), 1),
        "raw_download_MBps": round(_rate(size, raw_down), 1),
        "exchange_upload_MBps": round(_rate(size, ex_up), 1),
        "exchange_download_MBps": round(_rate(size, ex_down), 1),
        "disk_write_MBps": round(_rate(size, write_s), 1),
        "upload_vs_raw": round(raw_up / ex_up, 3),
        "download_vs_raw": round(raw_down / ex_down, 3),
        "verify_s": round(verify_s, 2),
        "verify_s_per_GB": round(verify_s / (size / 1e9), 2),
        "verify_stream_s": round(verify_stream_s, 2),
        "loadavg_before": [round(x, 2) for x in load_before],  # 1, 5 and 15 minutes
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="Bundle size in MB (default 200).")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "exchange.json")
    args = ap.parse_args()
    r = run(args.mb, args.out)
    mb = r["bundle_bytes"] / 1e6
    print(f"bundle: {mb:.1f} MB, {r['n_images']} PNGs, chunk {r['chunk_bytes']} B; {r['machine']}")
    print(f"{'':<22}{'MB/s':>8}{'vs raw':>9}")
    print(f"{'raw gRPC upload':<22}{r['raw_upload_MBps']:>8.1f}")
    print(
        f"{'exchange upload':<22}{r['exchange_upload_MBps']:>8.1f}{r['upload_vs_raw']:>9.0%}"
        "   (incl. fsync + full verification)"
    )
    print(f"{'raw gRPC download':<22}{r['raw_download_MBps']:>8.1f}")
    print(
        f"{'exchange download':<22}{r['exchange_download_MBps']:>8.1f}{r['download_vs_raw']:>9.0%}"
        "   (incl. sha256 + fsync)"
    )
    print(f"{'write + fsync a file':<22}{r['disk_write_MBps']:>8.1f}   (what storing the upload costs at least)")
    print(
        f"verification: {r['verify_s']:.2f} s for {mb:.0f} MB = {r['verify_s_per_GB']:.2f} s/GB; "
        f"without extracting (the store's): {r['verify_stream_s']:.2f} s"
    )
    print(f"load average before {r['loadavg_before']}, after {r['loadavg_after']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
