//! TLS for the tests: a throwaway CA and server certificates made at test time (rcgen,
//! ECDSA P-256 or RSA 2048), written to files the edge reads (`--tls-cert`, `--tls-key`), and
//! rustls clients that trust that CA only.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SerialNumber};
use rustls::pki_types::CertificateDer;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::ws::Ws;

/// A test CA and the directory its server certificates are written to.
pub struct TestPki {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (DER), for clients' root stores.
    pub ca_der: CertificateDer<'static>,
    /// The CA certificate (PEM), for clients outside Rust (Node, a browser's NSS db).
    pub ca_pem: String,
    /// Where `cert.pem` and `key.pem` are written.
    pub dir: PathBuf,
}

/// One issued server certificate.
pub struct ServerCert {
    /// The leaf (DER): what a client sees as the peer certificate.
    pub der: CertificateDer<'static>,
    /// The leaf's SubjectPublicKeyInfo (DER), for Chromium's `--ignore-certificate-errors-spki-list`.
    pub spki_der: Vec<u8>,
}

/// A date: year, month, day (UTC midnight).
pub type Ymd = (i32, u8, u8);

/// The key algorithm of a server certificate.
#[derive(Debug, Clone, Copy)]
pub enum KeyAlg {
    /// ECDSA with P-256 and SHA-256.
    EcdsaP256,
    /// RSA 2048 (PKCS#1 v1.5 with SHA-256).
    Rsa2048,
}

impl TestPki {
    /// A new CA ("roomcast test CA"), with its files under a fresh directory named for `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "roomcast test CA");
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA certificate");
        let dir = crate::scratch().join(format!("roomcast-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("tls dir");
        let ca_pem = cert.pem();
        std::fs::write(dir.join("ca.pem"), &ca_pem).expect("ca.pem");
        Self { issuer: Issuer::new(params, key), ca_der: cert.der().clone(), ca_pem, dir }
    }

    /// The certificate file the edge is given.
    pub fn cert_path(&self) -> String {
        self.dir.join("cert.pem").to_str().expect("utf-8").to_owned()
    }

    /// The key file the edge is given.
    pub fn key_path(&self) -> String {
        self.dir.join("key.pem").to_str().expect("utf-8").to_owned()
    }

    /// Issues a server certificate for `localhost` and `127.0.0.1` with this serial and common
    /// name, and writes it (cert.pem, key.pem) where the edge reads them.
    pub fn issue(&self, serial: u64, cn: &str, alg: KeyAlg) -> ServerCert {
        self.issue_params(serial, cn, alg, None)
    }

    /// Like [`issue`](Self::issue), valid only from `not_before` to `not_after` (year, month,
    /// day, UTC midnight): an expired or not-yet-valid certificate for the expiry warnings.
    pub fn issue_dated(&self, serial: u64, cn: &str, alg: KeyAlg, not_before: Ymd, not_after: Ymd) -> ServerCert {
        self.issue_params(serial, cn, alg, Some((not_before, not_after)))
    }

    fn issue_params(&self, serial: u64, cn: &str, alg: KeyAlg, dates: Option<(Ymd, Ymd)>) -> ServerCert {
        let key = match alg {
            KeyAlg::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyAlg::Rsa2048 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048),
        }
        .expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("server params");
        params.serial_number = Some(SerialNumber::from(serial));
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(((y0, m0, d0), (y1, m1, d1))) = dates {
            params.not_before = rcgen::date_time_ymd(y0, m0, d0);
            params.not_after = rcgen::date_time_ymd(y1, m1, d1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("server certificate");
        // Written whole then renamed: the edge may read them at any time (SIGHUP).
        let write = |name: &str, text: &str| {
            let tmp = self.dir.join(format!("{name}.tmp"));
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, self.dir.join(name)).expect("rename");
        };
        write("key.pem", &key.serialize_pem());
        write("cert.pem", &cert.pem());
        ServerCert { der: cert.der().clone(), spki_der: rcgen::PublicKeyData::subject_public_key_info(&key) }
    }

    /// A rustls client configuration that trusts this CA only.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("CA into the root store");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// Connects to a `wss://` URL trusting this CA, offering `proto` (None: no subprotocol).
    pub async fn connect(&self, url: &str, proto: Option<&str>) -> Ws {
        self.try_connect(url, proto).await.expect("wss connect")
    }

    /// Like `connect`, returning the error.
    pub async fn try_connect(
        &self,
        url: &str,
        proto: Option<&str>,
    ) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let mut req = url.into_client_request()?;
        if let Some(p) = proto {
            req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).expect("header"));
        }
        let connector = tokio_tungstenite::Connector::Rustls(self.client_config());
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(connector)).await?;
        Ok(ws)
    }
}

impl TestPki {
    /// Opens a TLS connection to `addr` (trusting this CA, server name 127.0.0.1) and sends a
    /// plain HTTP/1.1 GET of `path` on it (an `https://` request by hand: the event stream,
    /// the HTTP API over TLS). The caller reads the answer.
    pub async fn https_get(
        &self,
        addr: std::net::SocketAddr,
        path: &str,
        headers: &str,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        use tokio::io::AsyncWriteExt;
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let mut s =
            tokio_rustls::TlsConnector::from(self.client_config()).connect(name, tcp).await.expect("TLS handshake");
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n");
        s.write_all(req.as_bytes()).await.expect("request");
        s.flush().await.expect("flush");
        s
    }
}

/// The certificate a `wss` connection's server presented (its leaf), if it is one.
pub fn peer_leaf(ws: &Ws) -> Option<CertificateDer<'static>> {
    match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Rustls(s) => s.get_ref().1.peer_certificates()?.first().cloned(),
        _ => None,
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
