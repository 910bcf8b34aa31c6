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
//!
//! Certificate dates: every load reads the leaf's notBefore/notAfter ([`Validity`]); the edge
//! warns at start and on each SIGHUP when the leaf is expired, not yet valid or close to its
//! end ([`Validity::warning`]), exports `roomcast_tls_cert_expiry_seconds`, and reports an
//! expired leaf as `degraded` in /healthz. It still starts with one: an operator may be in the
//! middle of a rotation, and an edge that keeps its publish API and takes the new pair on
//! SIGHUP is more use than one that will not start (ARCHITECTURE.md, "Certificate dates").

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{PemObject, SectionKind};
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
    /// The dates of the leaf certificate in use (swapped with it).
    validity: ArcSwap<Validity>,
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
        let (key, validity) = load_pair(files, &provider)?;
        let resolver = Arc::new(Resolver(ArcSwap::from_pointee(key)));
        let config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Pair { path: show(&files.key), cert: show(&files.cert), why: e.to_string() })?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        Ok(Self {
            config: Arc::new(config),
            resolver,
            validity: ArcSwap::from_pointee(validity),
            files: files.clone(),
            provider,
        })
    }

    /// Reads the files again and makes them the certificate of every handshake from now on.
    /// Sessions under way keep theirs. On error the old certificate (and its dates) stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (key, validity) = load_pair(&self.files, &self.provider)?;
        self.resolver.0.store(Arc::new(key));
        self.validity.store(Arc::new(validity));
        Ok(())
    }

    /// The dates of the leaf certificate new handshakes get.
    pub fn validity(&self) -> Arc<Validity> {
        self.validity.load_full()
    }

    /// Logs the leaf's dates: a WARN when [`Validity::warning`] has something to say, else an
    /// INFO line with the end date. `when` says which load it was ("start", "SIGHUP").
    pub fn log_validity(&self, when: &str) {
        let v = self.validity();
        match v.warning(unix_now()) {
            Some(w) => tracing::warn!(when, "{w}"),
            None => tracing::info!(when, cert = %v.cert, not_after = %v.not_after_text, "TLS certificate valid"),
        }
    }
}

/// Seconds since the Unix epoch now (0 before it: a clock that wrong warns anyway).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Warn this long before notAfter (seconds), or at a third of the lifetime left when that is
/// shorter. ACME clients renew with a third of the lifetime left (certbot: 30 days of Let's
/// Encrypt's 90), so a 90-day certificate inside 14 days has missed about two weeks of daily
/// renewal attempts: something is broken, and two weeks is still time for a person to fix it
/// before browsers refuse the edge. A certificate whose whole life is shorter (Let's Encrypt's
/// 6-day ones) would warn from its first minute: for those the third is the threshold.
pub const EXPIRY_WARN_S: i64 = 14 * 86_400;

/// The leaf certificate's validity period (RFC 5280 4.1.2.5), as read from the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validity {
    /// The certificate file it came from.
    pub cert: String,
    /// notBefore, seconds since the Unix epoch.
    pub not_before: i64,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// notBefore as `openssl x509 -dates` prints it (`Dec  1 00:00:00 2026 +00:00`).
    pub not_before_text: String,
    /// notAfter, the same way.
    pub not_after_text: String,
}

/// Where `now` falls in a [`Validity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertState {
    /// Valid and not close to its end.
    Valid,
    /// Valid, with less than the warning threshold ([`EXPIRY_WARN_S`]) left.
    Expiring,
    /// Past notAfter: clients that check dates (every browser) refuse the handshake.
    Expired,
    /// Before notBefore (a clock behind, or a certificate issued for later).
    NotYetValid,
}

impl Validity {
    /// Seconds from `now` to notAfter (negative once past): `roomcast_tls_cert_expiry_seconds`.
    pub fn expires_in_s(&self, now: i64) -> i64 {
        self.not_after.saturating_sub(now)
    }

    /// Where `now` falls.
    pub fn state(&self, now: i64) -> CertState {
        let lifetime = self.not_after.saturating_sub(self.not_before);
        let warn = EXPIRY_WARN_S.min(lifetime / 3);
        if now < self.not_before {
            CertState::NotYetValid
        } else if now > self.not_after {
            CertState::Expired
        } else if self.expires_in_s(now) < warn {
            CertState::Expiring
        } else {
            CertState::Valid
        }
    }

    /// The warning to log for `now`, naming the file and the date (None: valid for a while).
    pub fn warning(&self, now: i64) -> Option<String> {
        let (cert, until) = (&self.cert, &self.not_after_text);
        match self.state(now) {
            CertState::Valid => None,
            CertState::Expiring => Some(format!(
                "tls.cert: {cert} expires {until} (in {}): renew it and send SIGHUP",
                time_left(self.expires_in_s(now))
            )),
            CertState::Expired => Some(format!(
                "tls.cert: {cert} expired {until}: clients refuse the handshake; install a new certificate and send SIGHUP"
            )),
            CertState::NotYetValid => Some(format!(
                "tls.cert: {cert} is not valid before {}: clients refuse the handshake until then (is the clock right?)",
                self.not_before_text
            )),
        }
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

/// Seconds as the largest whole unit that is at least 1: "3 d 4 h", "5 h 10 min", "50 s".
fn time_left(s: i64) -> String {
    match s {
        s if s >= 86_400 => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

fn load_pair(files: &TlsConfig, provider: &CryptoProvider) -> Result<(CertifiedKey, Validity), TlsError> {
    let cert_err = |why: String| TlsError::File { key: "tls.cert", path: show(&files.cert), why };
    let key_err = |why: String| TlsError::File { key: "tls.key", path: show(&files.key), why };
    let text = std::fs::read(&files.cert).map_err(|e| cert_err(e.to_string()))?;
    let chain = read_chain(&text).map_err(cert_err)?;
    let validity = leaf_validity(&chain[0], &files.cert).map_err(cert_err)?;
    let text = std::fs::read(&files.key).map_err(|e| key_err(e.to_string()))?;
    if let Some(why) = key_file_problem(&text) {
        return Err(key_err(why));
    }
    let key = PrivateKeyDer::from_pem_slice(&text)
        .map_err(|e| key_err(format!("no PKCS#8, PKCS#1 or SEC1 private key in PEM: {}", pem_error(&e))))?;
    // Loaded on its own so that a key whose DER is damaged is reported as the key's fault.
    let key =
        provider.key_provider.load_private_key(key).map_err(|e| key_err(format!("not a usable private key: {e}")))?;
    let pair = CertifiedKey::new(chain, key);
    // As CertifiedKey::from_der: a key that cannot tell its public half is let through.
    match pair.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok((pair, validity)),
        Err(e @ rustls::Error::InconsistentKeys(_)) => {
            Err(TlsError::Pair { path: show(&files.key), cert: show(&files.cert), why: e.to_string() })
        }
        // Anything else is rustls failing to read the leaf (x509-parser accepted it).
        Err(e) => Err(cert_err(format!("the first certificate cannot be used: {e}"))),
    }
}

/// A PEM error in words (the library prints a missing END marker as a list of bytes).
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => {
            format!("cut short: no \"-----END {}-----\" line", String::from_utf8_lossy(end_marker))
        }
        Error::IllegalSectionStart { line } => format!("bad BEGIN line {:?}", String::from_utf8_lossy(line)),
        other => other.to_string(),
    }
}

/// What a key file holds that the edge cannot use, said plainly (None: try to read it): an
/// encrypted key (the edge has no passphrase to give), or certificates only.
fn key_file_problem(text: &[u8]) -> Option<String> {
    let has = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
    if has(b"ENCRYPTED PRIVATE KEY") || has(b"Proc-Type: 4,ENCRYPTED") {
        return Some(
            "an encrypted private key: the edge needs it unencrypted (openssl pkey -in KEY -out PLAIN, kept readable by the edge only)"
                .into(),
        );
    }
    if has(b"-----BEGIN CERTIFICATE-----") && !has(b"PRIVATE KEY-----") {
        return Some("holds certificates and no private key: a certificate given as tls.key?".into());
    }
    None
}

/// The CERTIFICATE sections of a PEM file, each checked to be an X.509 certificate; the error
/// says what the file holds instead.
fn read_chain(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {}", pem_error(&e)))?;
    let mut chain = Vec::new();
    for (kind, der) in sections {
        if kind != SectionKind::Certificate {
            continue;
        }
        let n = chain.len() + 1;
        match x509_parser::parse_x509_certificate(&der) {
            Ok(([], _)) => chain.push(CertificateDer::from(der)),
            Ok((rest, _)) => {
                return Err(format!("CERTIFICATE {n} has {} bytes after the certificate", rest.len()));
            }
            Err(e) => return Err(format!("CERTIFICATE {n} is not an X.509 certificate: {e}")),
        }
    }
    if !chain.is_empty() {
        return Ok(chain);
    }
    // Say what the file is instead: the usual mix-ups have a recognisable shape.
    let found: Vec<String> = <(SectionKind, Vec<u8>)>::pem_slice_iter(text)
        .filter_map(Result::ok)
        .map(|(kind, _)| format!("{kind:?}"))
        .collect();
    Err(if text.iter().all(u8::is_ascii_whitespace) {
        "empty file: no CERTIFICATE".into()
    } else if !found.is_empty() {
        format!("no CERTIFICATE in the file (it holds: {}; a key or CSR given as tls.cert?)", found.join(", "))
    } else if text.first() == Some(&0x30) {
        "no CERTIFICATE in the file (binary: DER without PEM armour? `openssl x509 -inform der -in FILE -out FILE.pem`)"
            .into()
    } else {
        "no CERTIFICATE in the file".into()
    })
}

/// The leaf's notBefore/notAfter (the chain is parsed already; this cannot fail on it, but
/// says so if it does rather than panic).
fn leaf_validity(leaf: &CertificateDer<'_>, path: &Path) -> Result<Validity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("CERTIFICATE 1 is not an X.509 certificate: {e}"))?;
    let v = cert.validity();
    Ok(Validity {
        cert: show(path),
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
        not_before_text: v.not_before.to_string(),
        not_after_text: v.not_after.to_string(),
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
        let dir = roomcast_testsupport::scratch().join(format!("roomcast-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, "hello").unwrap();
        std::fs::write(&k, "hello").unwrap();
        let e = Tls::load(&TlsConfig { cert: c.clone(), key: k.clone(), http: false }).unwrap_err().to_string();
        assert!(e.starts_with("tls.cert:") && e.contains("no CERTIFICATE"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A self-signed ECDSA certificate and its key, in memory.
    fn pair() -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
        (cert, key)
    }

    /// Loads `cert` and `key` (file contents) from a fresh directory named `case` (unique across
    /// the tests, which run in parallel); the error.
    fn load_err(case: &str, cert: &[u8], key: &[u8]) -> (String, String, String) {
        let dir = roomcast_testsupport::scratch().join(format!("roomcast-tls-unit-{case}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        let e =
            Tls::load(&TlsConfig { cert: c.clone(), key: k.clone(), http: false }).map(|_| ()).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(dir);
        (e, show(&c), show(&k))
    }

    fn armour(tag: &str, der: &[u8]) -> Vec<u8> {
        pem::encode(&pem::Pem::new(tag, der.to_vec())).into_bytes()
    }

    #[test]
    fn a_good_pair_loads_and_its_dates_are_read() {
        let (cert, key) = pair();
        let dir = roomcast_testsupport::scratch().join(format!("roomcast-tls-unit-good-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let tls = Tls::load(&TlsConfig { cert: c.clone(), key: k, http: false }).unwrap();
        let v = tls.validity();
        // rcgen's default period: 1975-01-01 to 4096-01-01.
        assert_eq!((v.not_before, v.not_after), (157_766_400, 67_090_118_400), "{v:?}");
        assert_eq!(v.cert, show(&c));
        assert_eq!(v.state(unix_now()), CertState::Valid);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Every way a certificate file can fail to hold a certificate is reported as `tls.cert`,
    /// with the reason, never as a key that "does not go with" it.
    #[test]
    fn a_cert_file_without_a_certificate_is_a_tls_cert_error() {
        let (cert, key) = pair();
        let der = cert.der().to_vec();
        let key_pem = key.serialize_pem();
        let csr = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("truncated", armour("CERTIFICATE", &der[..der.len() / 2]), "not an X.509 certificate"),
            ("garbage-der", armour("CERTIFICATE", b"hello world, not DER"), "not an X.509 certificate"),
            ("trailing", armour("CERTIFICATE", &[der.as_slice(), b"xx"].concat()), "bytes after the certificate"),
            ("bad-base64", b"-----BEGIN CERTIFICATE-----\n!!!*&^\n-----END CERTIFICATE-----\n".to_vec(), "not PEM"),
            ("key-as-cert", key_pem.clone().into_bytes(), "a key or CSR given as tls.cert"),
            ("csr", csr.into_bytes(), "a key or CSR given as tls.cert"),
            ("empty", Vec::new(), "empty file"),
            ("der-unarmoured", der.clone(), "DER without PEM armour"),
        ];
        for (case, file, why) in cases {
            let (e, c, _) = load_err(&format!("cert-{case}"), &file, key_pem.as_bytes());
            assert!(e.starts_with(&format!("tls.cert: {c}: ")), "{case}: {e}");
            assert!(e.contains(why), "{case}: wanted {why:?} in {e}");
        }
    }

    /// A key file that holds no usable key is `tls.key`, with the reason; a good key of
    /// another certificate is still "does not go with".
    #[test]
    fn a_key_file_without_a_usable_key_is_a_tls_key_error() {
        let (cert, key) = pair();
        let cert_pem = cert.pem();
        let der = key.serialize_der();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("truncated", armour("PRIVATE KEY", &der[..der.len() / 2]), "not a usable private key"),
            ("garbage-der", armour("PRIVATE KEY", b"hello world, not DER"), "not a usable private key"),
            ("cert-as-key", cert_pem.clone().into_bytes(), "a certificate given as tls.key?"),
            ("empty", Vec::new(), "no PKCS#8"),
            // From a new user's trial: an encrypted key said "no items found" or "base64 decode
            // error", and a cut-short file listed the END marker's bytes as numbers.
            (
                "encrypted-pkcs8",
                b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n".to_vec(),
                "an encrypted private key",
            ),
            (
                "encrypted-sec1",
                b"-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00\n\nMIIB\n-----END EC PRIVATE KEY-----\n"
                    .to_vec(),
                "an encrypted private key",
            ),
            ("cut-short", key.serialize_pem().as_bytes()[..100].to_vec(), "cut short: no \"-----END PRIVATE KEY-----\" line"),
        ];
        for (case, file, why) in cases {
            let (e, _, k) = load_err(&format!("key-{case}"), cert_pem.as_bytes(), &file);
            assert!(e.starts_with(&format!("tls.key: {k}: ")), "{case}: {e}");
            assert!(e.contains(why) && !e.contains("does not go with"), "{case}: wanted {why:?} in {e}");
        }
        let (_, other) = pair();
        let (e, _, k) = load_err("key-mismatch", cert_pem.as_bytes(), other.serialize_pem().as_bytes());
        assert!(e.starts_with(&format!("tls.key: {k} does not go with tls.cert")), "{e}");
    }

    fn dates(not_before: i64, not_after: i64) -> Validity {
        Validity {
            cert: "/etc/roomcast/cert.pem".into(),
            not_before,
            not_after,
            not_before_text: "then".into(),
            not_after_text: "Jan  1 00:00:00 2027 +00:00".into(),
        }
    }

    #[test]
    fn the_expiry_states_and_warnings_follow_the_clock() {
        const DAY: i64 = 86_400;
        // A 90-day certificate: warned about from 14 days before its end.
        let v = dates(0, 90 * DAY);
        assert_eq!(v.state(-1), CertState::NotYetValid);
        assert!(v.warning(-1).unwrap().contains("not valid before then"));
        assert_eq!(v.state(0), CertState::Valid);
        assert_eq!(v.warning(76 * DAY), None);
        assert_eq!(v.state(76 * DAY + 1), CertState::Expiring);
        let w = v.warning(80 * DAY).unwrap();
        assert!(w.contains("/etc/roomcast/cert.pem expires Jan  1 00:00:00 2027 +00:00 (in 10 d 0 h)"), "{w}");
        assert_eq!(v.state(90 * DAY), CertState::Expiring, "valid up to and including notAfter");
        assert_eq!(v.state(90 * DAY + 1), CertState::Expired);
        assert!(v.warning(91 * DAY).unwrap().contains("/etc/roomcast/cert.pem expired Jan  1 00:00:00 2027"));
        assert_eq!(v.expires_in_s(91 * DAY), -DAY);
        // A 6-day certificate: warned about with a third of its life left, not from the start.
        let v = dates(0, 6 * DAY);
        assert_eq!(v.state(DAY), CertState::Valid);
        assert_eq!(v.state(4 * DAY + 1), CertState::Expiring);
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
