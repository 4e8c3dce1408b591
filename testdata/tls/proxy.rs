//! A TLS-terminating proxy for the adapters' TLS tests: it accepts TLS with the test server
//! certificate (`server.pem`, signed by `ca.pem`, for `localhost` and 127.0.0.1) and forwards
//! the plain bytes to the real server, so a client's whole TLS path (handshake, certificate
//! and host name checks) runs against a real Postgres or Redis behind it. Shared by the test
//! binaries of `cqrs-postgres` and `cqrs-redis` (included with `#[path]`). It can also ask
//! clients for a certificate the test CA signed (`client.pem`).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A file of `testdata/tls`.
pub(crate) fn tls_file(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/tls")).join(name)
}

/// What the client sends before its TLS handshake.
#[derive(Clone, Copy, Debug)]
#[allow(dead_code)] // Each test binary uses one of them.
pub(crate) enum Preamble {
    /// Nothing: TLS from the first byte (Redis).
    None,
    /// Postgres's `SSLRequest`, answered `S`; a client that starts without it is refused.
    Postgres,
}

pub(crate) struct TlsProxy {
    pub(crate) addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
}

impl TlsProxy {
    /// Accepts TLS on a free port of 127.0.0.1 and forwards each connection to `upstream`.
    #[allow(dead_code)] // Each test binary uses what it needs.
    pub(crate) async fn start(upstream: String, preamble: Preamble) -> TlsProxy {
        Self::start_on("127.0.0.1", upstream, preamble).await
    }

    /// The same on `ip` (another loopback address, 127.0.0.2, is one the test certificate
    /// does not name).
    pub(crate) async fn start_on(ip: &str, upstream: String, preamble: Preamble) -> TlsProxy {
        Self::launch(ip, upstream, preamble, false).await
    }

    /// On 127.0.0.1, accepting only clients that present a certificate the test CA signed.
    #[allow(dead_code)] // Each test binary uses what it needs.
    pub(crate) async fn start_requiring_client_certs(
        upstream: String,
        preamble: Preamble,
    ) -> TlsProxy {
        Self::launch("127.0.0.1", upstream, preamble, true).await
    }

    async fn launch(
        ip: &str,
        upstream: String,
        preamble: Preamble,
        client_certs: bool,
    ) -> TlsProxy {
        let certificates = CertificateDer::pem_file_iter(tls_file("server.pem"))
            .expect("read server.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("parse server.pem");
        let key = PrivateKeyDer::from_pem_file(tls_file("server.key")).expect("read server.key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions");
        let builder = if client_certs {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(tls_file("ca.pem")).expect("read ca.pem") {
                roots.add(ca.expect("parse ca.pem")).expect("the test CA");
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("a client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(certificates, key)
            .expect("the test certificate and key");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind((ip, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, counted, upstream) =
                    (acceptor.clone(), counted.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = serve(client, acceptor, preamble, &counted, &upstream).await;
                });
            }
        });
        TlsProxy { addr, handshakes }
    }

    /// How many TLS handshakes completed.
    pub(crate) fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut client: TcpStream,
    acceptor: TlsAcceptor,
    preamble: Preamble,
    handshakes: &AtomicUsize,
    upstream: &str,
) -> std::io::Result<()> {
    if let Preamble::Postgres = preamble {
        // `SSLRequest`: length 8, code 80877103.
        let mut request = [0u8; 8];
        client.read_exact(&mut request).await?;
        if request != [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f] {
            return Ok(());
        }
        client.write_all(b"S").await?;
    }
    let mut tls = acceptor.accept(client).await?;
    handshakes.fetch_add(1, Ordering::SeqCst);
    let mut server = TcpStream::connect(upstream).await?;
    tokio::io::copy_bidirectional(&mut tls, &mut server).await?;
    Ok(())
}
