//! wss: TLS on the WebSocket listener, with rustls (aws-lc-rs provider).
//!
//! rustls is a state machine without I/O: the shards feed it the bytes their io_uring receives
//! complete with and send what it produces (shard/tls.rs). This module holds what the shards
//! share: the [`ServerConfig`] and the certificate behind it, which SIGHUP swaps ([`Tls::reload`])
//! without touching a session already under way (a session keeps the key it was made with; new
//! handshakes load the new one), and the kTLS probe.
//!
//! Serialize-once holds up to the encryption: a room's batch is encoded once and the same
//! `Bytes` queued on every member; each TLS session then encrypts those bytes with its own keys
//! (a copy of the ciphertext per member, as any TLS server must: the keys differ per session).
//! With kTLS (not used yet, see [`probe_ktls`]) the kernel would do that step from the shared
//! plaintext.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// `[tls]`: serve `wss://` (and SSE over `https://`) on the WebSocket listener.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first (`--tls-cert`). Read at start and on
    /// every SIGHUP.
    pub cert: PathBuf,
    /// PEM file with the private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) (`--tls-key`).
    pub key: PathBuf,
    /// Serve the HTTP API (`http`: publish, `/v1/route`, /metrics...) over TLS too, with the
    /// same certificate (`--tls-http`). Default false: the API is internal (loopback by
    /// default), and `edge top`, Prometheus and health probes keep plain HTTP. Set it when
    /// browsers on https pages ask this edge's `/v1/route` directly (dispatch must be https
    /// for them, like the WebSocket).
    #[serde(default)]
    pub http: bool,
}

/// A certificate or key that cannot be used, naming the config key and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read or holds no usable PEM item.
    #[error("{key}: {path}: {why}")]
    File {
        /// `tls.cert` or `tls.key`.
        key: &'static str,
        /// The file named.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// The key does not match the certificate, or rustls refuses the pair.
    #[error("tls.key: {path} does not go with tls.cert {cert}: {why}")]
    Pair {
        /// The key file.
        path: String,
        /// The certificate file.
        cert: String,
        /// rustls's reason.
        why: String,
    },
}

/// The certificate every new handshake gets; swapped whole on reload.
#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The shards' TLS: one [`ServerConfig`] (session cache and ticketer included) for every
/// shard, and the files to reload from.
pub struct Tls {
    /// What each accepted connection's `ServerConnection` is made from.
    pub config: Arc<ServerConfig>,
    resolver: Arc<Resolver>,
    files: TlsConfig,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the certificate and key and builds the server configuration (TLS 1.2 and 1.3,
    /// rustls's safe defaults, no client certificates).
    pub fn load(files: &TlsConfig) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = load_pair(files, &provider)?;
        let resolver = Arc::new(Resolver(ArcSwap::from_pointee(key)));
        let config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Pair { path: show(&files.key), cert: show(&files.cert), why: e.to_string() })?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        Ok(Self { config: Arc::new(config), resolver, files: files.clone(), provider })
    }

    /// Reads the files again and makes them the certificate of every handshake from now on.
    /// Sessions under way keep theirs. On error the old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_pair(&self.files, &self.provider)?;
        self.resolver.0.store(Arc::new(key));
        Ok(())
    }
}

/// Most TLS handshakes the HTTP API runs at once; more wait in the kernel's accept queue.
const HTTP_HANDSHAKES: usize = 256;

/// The HTTP API's listener over TLS, for `axum::serve`: accepts on the tokio runtime and runs
/// each handshake in a task of its own (bounded in time and number), so a slow client does not
/// hold up the others; finished sessions are handed to axum.
pub struct HttpsListener {
    rx: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::net::SocketAddr)>,
    addr: std::net::SocketAddr,
}

impl HttpsListener {
    /// Starts accepting on `tcp` (on the current tokio runtime); `timeout` bounds a handshake.
    pub fn new(tcp: tokio::net::TcpListener, tls: &Tls, timeout: std::time::Duration) -> std::io::Result<Self> {
        let addr = tcp.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(HTTP_HANDSHAKES);
        let permits = Arc::new(tokio::sync::Semaphore::new(HTTP_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (tcp, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off a little, as axum's own listener does.
                        tracing::warn!(error = %e, "https accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "https handshake failed"),
                        Err(_) => tracing::debug!(peer = %peer, "https handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { rx, addr })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (its runtime is stopping): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

fn load_pair(files: &TlsConfig, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let file_err = |key, path: &Path, why: String| TlsError::File { key, path: show(path), why };
    let text = std::fs::read(&files.cert).map_err(|e| file_err("tls.cert", &files.cert, e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err("tls.cert", &files.cert, format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(file_err("tls.cert", &files.cert, "no CERTIFICATE in the file".into()));
    }
    let text = std::fs::read(&files.key).map_err(|e| file_err("tls.key", &files.key, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&text)
        .map_err(|e| file_err("tls.key", &files.key, format!("no PKCS#8, PKCS#1 or SEC1 private key in PEM: {e}")))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Pair {
        path: show(&files.key),
        cert: show(&files.cert),
        why: e.to_string(),
    })
}

/// What the kTLS probe found.
#[derive(Debug, Clone)]
pub enum Ktls {
    /// The kernel accepts the `tls` upper-layer protocol on a TCP socket.
    Available,
    /// It does not (the error from `setsockopt(TCP_ULP, "tls")`, and what it means).
    Unavailable(String),
}

impl std::fmt::Display for Ktls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Available => f.write_str(
                "kTLS available (tls ULP accepted); encrypting in user space (the kTLS data path is not built yet)",
            ),
            Self::Unavailable(why) => write!(f, "kTLS unavailable: {why}; encrypting in user space"),
        }
    }
}

/// Probes for kernel TLS: attaches the `tls` ULP to a connected loopback TCP socket (the
/// first step of handing a session's keys to the kernel; Linux 4.13+, `CONFIG_TLS`).
pub fn probe_ktls() -> Ktls {
    match crate::sys::try_tls_ulp() {
        Ok(()) => Ktls::Available,
        Err(e) => {
            let hint = match e.raw_os_error() {
                Some(libc::ENOENT) => " (no `tls` module: kernel built without CONFIG_TLS, or `modprobe tls` not run)",
                Some(libc::ENOPROTOOPT) => " (kernel without TCP_ULP: before Linux 4.13)",
                _ => "",
            };
            Ktls::Unavailable(format!("setsockopt(TCP_ULP, \"tls\"): {e}{hint}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_names_its_key() {
        let e =
            Tls::load(&TlsConfig { cert: "/nonexistent/c.pem".into(), key: "/nonexistent/k.pem".into(), http: false })
                .unwrap_err()
                .to_string();
        assert!(e.starts_with("tls.cert: /nonexistent/c.pem"), "{e}");
    }

    #[test]
    fn a_file_without_pem_names_its_key() {
        let dir = std::env::temp_dir().join(format!("roomcast-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, "hello").unwrap();
        std::fs::write(&k, "hello").unwrap();
        let e = Tls::load(&TlsConfig { cert: c.clone(), key: k.clone(), http: false }).unwrap_err().to_string();
        assert!(e.starts_with("tls.cert:") && e.contains("no CERTIFICATE"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_ktls_probe_answers_and_says_which_path() {
        let k = probe_ktls();
        let line = k.to_string();
        assert!(line.contains("encrypting in user space"), "{line}");
        if let Ktls::Unavailable(why) = &k {
            eprintln!("kTLS path skipped: this kernel has no kTLS ({why}); the user-space path is the one tested");
        } else {
            eprintln!("kTLS is available on this kernel, but its data path is not built: user space is tested");
        }
    }
}
