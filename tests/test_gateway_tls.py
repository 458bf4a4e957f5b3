"""TLS: with ``gateway.tls_cert``/``tls_key`` set, ``wss://`` and ``https://`` (trustme certs)."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from daemon.runtime.daemon import open_daemon
from daemon.testing.client import WsClient, handshake_status
from daemon.testing.config import make_config
from daemon.testing.stores import add_user
from daemon.workers.audio import wav_header_ok


async def test_wss_and_https_with_a_trusted_certificate(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    cfg = make_config(tmp_path, gateway={"tls_cert": str(cert_path), "tls_key": str(key_path)})
    _, token = await add_user(pg_url, "secure", "plus")
    async with open_daemon(cfg, redis_url, pg_url) as d:
        assert d.addresses is not None
        ws_url, http_url = d.addresses.ws_url, d.addresses.http_url
        assert ws_url.startswith("wss://") and http_url.startswith("https://")

        async with WsClient.connect(ws_url, token, ssl_context=client_ctx) as client:
            await client.synthesize("doc", ["Encrypted all the way."])
            await client.until(lambda _: 0 in client.terminal("doc"))
        frame = client.terminal("doc")[0]
        assert frame["status"] == "cached"

        async with httpx.AsyncClient(base_url=http_url, verify=client_ctx) as http:
            audio = await http.get(frame["audio_url"])
        # The operations listener is plain HTTP on loopback (docs/operations.md).
        async with httpx.AsyncClient(base_url=d.addresses.ops_url) as http:
            health = await http.get("/healthz")
        assert audio.status_code == 200 and wav_header_ok(audio.content)
        assert health.status_code == 200 and health.json()["services"]["gateway"]["state"] == (
            "running"
        )

        # no token over TLS: still a plain 401 at the handshake
        status, _ = await handshake_status(ws_url, ssl_context=client_ctx)
        assert status == 401

        # a client that does not trust the certificate, and one speaking plain text to the TLS
        # port, fail on their side; the gateway keeps serving
        untrusting = ssl.create_default_context()
        with trio.fail_after(10):
            tls = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", d.addresses.ws_port, ssl_context=untrusting
            )
            async with tls:
                with pytest.raises(trio.BrokenResourceError) as refused:
                    await tls.do_handshake()
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
        stream = await trio.open_tcp_stream("127.0.0.1", d.addresses.ws_port)
        async with stream:
            await stream.send_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n")
        async with WsClient.connect(ws_url, token, ssl_context=client_ctx) as client:
            await client.synthesize("doc", ["Encrypted all the way."])
            assert (await client.receive())["status"] == "cached"
        assert d.supervisor.states["gateway"].restarts == 0
