//! The TLS configuration of a `rediss://` connection (the `tls` feature): rustls with ring,
//! trusting the system's root certificates or the CA file of
//! [`ConnectionOptions::tls_ca_file`](crate::ConnectionOptions::tls_ca_file), with the client
//! certificate of
//! [`ConnectionOptions::tls_client_cert`](crate::ConnectionOptions::tls_client_cert) if set.

use crate::{ConnectError, ConnectionOptions};
use fred::error::{Error as FredError, ErrorKind as FredKind};
use fred::types::config::{Config, Server, ServerConfig, TlsConfig, TlsConnector};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;

/// `config` with TLS set up when the options' URL asks for it, built once per options.
pub(crate) fn applied(
    mut config: Config,
    options: &ConnectionOptions,
) -> Result<Config, ConnectError> {
    if !crate::options::asks_for_tls(&options.url) {
        return Ok(config);
    }
    let tls = match options.tls_config.get() {
        Some(tls) => tls.clone(),
        None => {
            let client_cert = options
                .tls_client_cert
                .as_ref()
                .map(|(cert, key)| (cert.as_path(), key.as_path()));
            let tls =
                self::config(options.tls_ca_file.as_deref(), client_cert).map_err(|problem| {
                    ConnectError::Invalid {
                        problems: vec![problem],
                    }
                })?;
            // Only a configuration that was built is kept: a file fixed after a failed
            // connect is read on the next.
            let _ = options.tls_config.set(tls.clone());
            tls
        }
    };
    config.tls = Some(tls);
    // `rediss://[::1]:6380`: the URL's host keeps its brackets, which no TLS server name
    // takes, and the handshake failed as if the certificate were wrong. The address without
    // them is what the certificate must name.
    match &mut config.server {
        ServerConfig::Centralized { server } => name_without_brackets(server),
        ServerConfig::Clustered { hosts, .. } | ServerConfig::Sentinel { hosts, .. } => {
            hosts.iter_mut().for_each(name_without_brackets)
        }
        #[allow(unreachable_patterns)]
        _ => {}
    }
    Ok(config)
}

/// Sets the TLS server name of a server whose host is a bracketed IPv6 address to the address.
fn name_without_brackets(server: &mut Server) {
    if server.tls_server_name.is_some() {
        return;
    }
    if let Some(address) = server
        .host
        .strip_prefix('[')
        .and_then(|host| host.strip_suffix(']'))
    {
        server.tls_server_name = Some(address.into());
    }
}

/// A client configuration with ring as its crypto provider, named here rather than taken
/// from the process default: rustls panics when asked for the default in a program that
/// links two providers (another dependency may bring aws-lc-rs).
pub(crate) fn config(
    ca_file: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
) -> Result<TlsConfig, String> {
    let roots = match ca_file {
        Some(path) => roots_from_file(path)?,
        None => system_roots()?,
    };
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS cannot be set up: {e}"))?
            .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates(cert, "tls_client_cert")?;
            let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                format!(
                    "tls_client_cert key `{}` cannot be used: {e} (expected a PEM private key: \
                     PKCS#8, PKCS#1 or SEC1)",
                    key.display()
                )
            })?;
            builder
                .with_client_auth_cert(chain, private_key)
                .map_err(|e| {
                    format!(
                        "tls_client_cert `{}` with key `{}` cannot be used: {e}",
                        cert.display(),
                        key.display()
                    )
                })?
        }
    };
    Ok(TlsConnector::from(config).into())
}

/// The certificates in the PEM file at `path` (given with the option `setting`), at least one.
fn certificates(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let pem =
        std::fs::read(path).map_err(|e| format!("{setting} `{shown}` cannot be read: {e}"))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{setting} `{shown}` is not a PEM certificate file: {e}"))?;
    if certificates.is_empty() {
        return Err(format!(
            "{setting} `{shown}` holds no certificate (expected PEM blocks that begin with \
             `-----BEGIN CERTIFICATE-----`)"
        ));
    }
    Ok(certificates)
}

fn roots_from_file(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(path, "tls_ca_file")? {
        roots.add(certificate).map_err(|e| {
            format!(
                "tls_ca_file `{}` holds a certificate rustls refuses: {e}",
                path.display()
            )
        })?;
    }
    Ok(roots)
}

/// The system's root certificates. A store with some unreadable entries still counts: the
/// ones that load are used (fred's own default fails on the first bad file).
fn system_roots() -> Result<RootCertStore, String> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        return Err(format!(
            "TLS needs root certificates, and none were found in the system's store{}: install \
             the system's CA certificates (`ca-certificates` on Debian), point SSL_CERT_FILE at \
             a PEM bundle, or set tls_ca_file",
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join("; "))
            }
        ));
    }
    if !loaded.errors.is_empty() {
        tracing::warn!(
            errors = ?loaded.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "some of the system's root certificates could not be loaded; using the {added} that could"
        );
    }
    Ok(roots)
}

/// What rustls reported, when `error` (on a connection that asked for TLS) is a failed TLS
/// handshake. fred reports those as I/O errors of kind `InvalidData` (how tokio-rustls passes
/// every rustls error on), whose details name the rustls error; a refused or reset connection
/// is another I/O kind.
pub(crate) fn failure(error: &FredError) -> Option<String> {
    let details = error.details();
    let tls = *error.kind() == FredKind::Tls
        || (*error.kind() == FredKind::IO && details.contains("kind: InvalidData"));
    tls.then(|| details.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bracketed IPv6 host is checked against the certificate by its address: with the
    /// brackets, no TLS server name took it and every handshake failed.
    #[test]
    fn an_ipv6_host_is_named_by_its_address() {
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/tls/ca.pem");
        for url in ["rediss://[::1]:6380", "rediss-cluster://[fd00::5]:30001"] {
            let options = ConnectionOptions::new(url).tls_ca_file(ca);
            let config = applied(Config::from_url(url).unwrap(), &options).unwrap();
            let servers = match &config.server {
                ServerConfig::Centralized { server } => vec![server.clone()],
                ServerConfig::Clustered { hosts, .. } => hosts.clone(),
                other => panic!("{other:?}"),
            };
            for server in servers {
                let name = server
                    .tls_server_name
                    .clone()
                    .unwrap_or(server.host.clone());
                assert!(
                    rustls::pki_types::ServerName::try_from(&*name).is_ok(),
                    "{url}: `{name}` is no server name"
                );
            }
        }
    }

    /// The configuration is built once per options and their clones: a CA file gone after the
    /// first connect is not read again; setting a CA file anew builds anew.
    #[test]
    fn the_configuration_is_built_once_per_options() {
        let ca = std::env::temp_dir().join(format!("cqrs-redis-ca-{}.pem", uuid::Uuid::new_v4()));
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/tls/ca.pem"),
            &ca,
        )
        .unwrap();
        let options = ConnectionOptions::new("rediss://127.0.0.1:6380").tls_ca_file(&ca);
        let config = || Config::from_url("redis://127.0.0.1:6380").unwrap();
        assert!(applied(config(), &options).unwrap().tls.is_some());
        std::fs::remove_file(&ca).unwrap();
        let clone = options.clone();
        assert!(
            applied(config(), &clone).unwrap().tls.is_some(),
            "built once"
        );
        let Err(ConnectError::Invalid { problems }) = applied(config(), &clone.tls_ca_file(&ca))
        else {
            panic!("a CA file set anew is read anew");
        };
        assert!(problems[0].contains("cannot be read"), "{problems:?}");
    }
}
