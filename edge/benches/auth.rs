//! What a connection token costs at the upgrade: `Verifier::verify` for HS256 and ES256 tokens
//! (paid once per connection, on the shard thread). Multiply by 10^4 for a reconnect storm of
//! 10^4 connects.
//!
//! Run: `cargo bench -p edge --bench auth`. Results: bench-results/*-auth/.

use criterion::{Criterion, criterion_group, criterion_main};
use edge::auth::{Claims, Verifier};
use edge::config::{AuthConfig, KeyAlg, PublicKeyConfig, Secret};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const SECRET: &str = "bench-secret-0123456789abcdef-0123456789";

fn claims() -> Claims {
    Claims {
        sub: "user-12345".into(),
        exp: 4_000_000_000,
        rooms: Some(vec!["show-*".into()]),
        publish: None,
        nbf: None,
    }
}

fn verify(c: &mut Criterion) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
    let mut g = c.benchmark_group("verify");
    let hs = AuthConfig { hs256_secret: Some(Secret::new(SECRET)), ..AuthConfig::default() };
    let v = Verifier::from_config(&hs, None).unwrap().unwrap();
    let t = edge::auth::sign_hs256(SECRET.as_bytes(), &claims()).unwrap();
    g.bench_function("HS256", |b| b.iter(|| v.verify(&t, 1_800_000_000).unwrap()));
    let es = AuthConfig {
        keys: vec![PublicKeyConfig {
            kid: Some("a".into()),
            alg: KeyAlg::Es256,
            file: format!("{dir}/es256-a.pub.pem"),
        }],
        ..AuthConfig::default()
    };
    let v = Verifier::from_config(&es, None).unwrap().unwrap();
    let pem = std::fs::read(format!("{dir}/es256-a.key.pem")).unwrap();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("a".into());
    let t = jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_ec_pem(&pem).unwrap()).unwrap();
    g.bench_function("ES256", |b| b.iter(|| v.verify(&t, 1_800_000_000).unwrap()));
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
