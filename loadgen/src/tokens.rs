//! Connection tokens for authenticated runs: `loadgen tokens` signs one JWT per connection
//! (distinct `sub` = `<prefix><N>`, like real users) into a file, one per line; `run --tokens`
//! sends line N as connection N's `&token=`. Signing is a step of its own so that its cost
//! (an ES256 or RS256 signature per token) is neither in the connect phase nor in its timing.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// Signature algorithms the edge verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Alg {
    /// HMAC-SHA256 with the shared secret in `ROOMCAST_AUTH_SECRET` (the edge's variable).
    Hs256,
    /// ECDSA P-256, private key from `--key` (PKCS#8 PEM).
    Es256,
    /// RSA PKCS#1 v1.5 SHA-256, private key from `--key` (PEM).
    Rs256,
}

// Numeric flags take a value with a leading '-', so a negative number gets the flag's own
// error rather than clap's "unexpected argument" (as `run`'s do).
#[derive(clap::Args, Clone, Debug)]
pub struct TokensArgs {
    #[arg(long, value_enum)]
    alg: Alg,
    /// Private key file (PEM) for ES256 and RS256.
    #[arg(long)]
    key: Option<PathBuf>,
    /// `kid` header, matched by the edge against `auth.keys[].kid`.
    #[arg(long)]
    kid: Option<String>,
    /// How many tokens (lines), at least 1.
    #[arg(long, value_parser = crate::at_least_one::<usize>, allow_negative_numbers = true)]
    count: usize,
    /// `sub` of token N is this prefix followed by N.
    #[arg(long, default_value = "u")]
    sub_prefix: String,
    /// Seconds until `exp`, at least 1 (0 signed tokens that had expired when written).
    #[arg(long, default_value_t = 3600, value_parser = crate::at_least_one::<u64>, allow_negative_numbers = true)]
    ttl: u64,
    /// `rooms` claim: room names or `prefix*`, comma separated (absent: every room).
    #[arg(long, value_delimiter = ',')]
    rooms: Vec<String>,
    /// `pub` claim: kinds the user may publish over the socket, comma separated.
    #[arg(long = "pub", value_delimiter = ',')]
    publish: Vec<String>,
    /// Output file (one token per line).
    #[arg(long)]
    out: PathBuf,
}

/// The claims the edge reads (docs/PROTOCOL.md).
#[derive(Serialize)]
struct Claims<'a> {
    sub: String,
    exp: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    rooms: &'a [String],
    #[serde(rename = "pub", skip_serializing_if = "<[String]>::is_empty")]
    publish: &'a [String],
}

pub fn sign(a: &TokensArgs) -> anyhow::Result<()> {
    let pem = || -> anyhow::Result<Vec<u8>> {
        let path = a.key.as_ref().context("--key: a private key (PEM) is needed for ES256 and RS256")?;
        std::fs::read(path).with_context(|| format!("read {}", path.display()))
    };
    let (alg, key) = match a.alg {
        Alg::Hs256 => {
            let secret = std::env::var("ROOMCAST_AUTH_SECRET").context("HS256: set ROOMCAST_AUTH_SECRET")?;
            anyhow::ensure!(secret.len() >= 32, "ROOMCAST_AUTH_SECRET: at least 32 bytes (the edge refuses less)");
            (Algorithm::HS256, EncodingKey::from_secret(secret.as_bytes()).context("HS256 secret")?)
        }
        Alg::Es256 => (Algorithm::ES256, EncodingKey::from_ec_pem(&pem()?).context("--key: not an EC key")?),
        Alg::Rs256 => (Algorithm::RS256, EncodingKey::from_rsa_pem(&pem()?).context("--key: not an RSA key")?),
    };
    let mut header = Header::new(alg);
    header.kid.clone_from(&a.kid);
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs().saturating_add(a.ttl);
    let one = |n: usize| {
        let c = Claims { sub: format!("{}{n}", a.sub_prefix), exp, rooms: &a.rooms, publish: &a.publish };
        jsonwebtoken::encode(&header, &c, &key).context("sign")
    };
    // ES256 and RS256 signatures take up to milliseconds each: one thread per CPU.
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let per = a.count.div_ceil(threads).max(1);
    let chunks: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..a.count)
            .step_by(per)
            .map(|lo| s.spawn(move || (lo..(lo + per).min(a.count)).map(one).collect::<anyhow::Result<Vec<_>>>()))
            .collect();
        handles.into_iter().map(|h| h.join().expect("signer thread")).collect::<anyhow::Result<_>>()
    })?;
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(&a.out).with_context(|| format!("create {}", a.out.display()))?);
    for t in chunks.iter().flatten() {
        writeln!(out, "{t}")?;
    }
    out.flush()?;
    Ok(())
}

/// Lines `first..first + count` of a token file (connection N's token is line N).
pub fn load(path: &std::path::Path, first: usize, count: usize) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--tokens: read {}", path.display()))?;
    let lines: Vec<String> = text.lines().skip(first).take(count).map(str::to_owned).collect();
    anyhow::ensure!(
        lines.len() == count,
        "--tokens {}: {} lines, connections {first}..{} need one each",
        path.display(),
        first + lines.len(),
        first + count
    );
    Ok(lines)
}
