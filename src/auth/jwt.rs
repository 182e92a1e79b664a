//! JWT verification for subscribers: HS256 with a shared secret, or RS256 / ES256 / EdDSA with
//! a PEM public key or a JWKS file. `exp` and `sub` are required; `nbf`, and `iss` / `aud` when
//! configured, are checked, with a small leeway for clock skew. `alg: none` and any algorithm
//! we hold no key for are refused.

use std::{path::Path, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use serde::Deserialize;

/// Where the verification keys and rules come from (the `--jwt-*` flags).
#[derive(Clone, Debug, Default)]
pub struct JwtSettings {
    pub secret_file: Option<std::path::PathBuf>,
    pub public_key_file: Option<std::path::PathBuf>,
    pub jwks_file: Option<std::path::PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

impl JwtSettings {
    pub fn is_configured(&self) -> bool {
        self.secret_file.is_some() || self.public_key_file.is_some() || self.jwks_file.is_some()
    }
}

/// A key configuration that cannot be used; reported at start.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

pub struct JwtVerifier {
    keys: Vec<Key>,
    settings: JwtSettings,
}

/// The claims ssegate reads. Unknown claims are ignored.
#[derive(Debug, Deserialize)]
pub struct Claims {
    /// Optional here only so that its absence is reported as such, not as a malformed token.
    pub sub: Option<String>,
    /// A NumericDate (RFC 7519 §2) may have a fraction (`Date.now() / 1000` in JavaScript);
    /// it is dropped, so that a stream closed at `exp` never outlives its token.
    #[serde(deserialize_with = "numeric_date")]
    pub exp: u64,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub topics: Vec<String>,
}

/// A NumericDate as whole seconds since the epoch, rounded down: an integer, or a number with
/// a fraction. Negative, non-finite or out-of-range values are refused (a malformed token).
/// (jsonwebtoken's own `exp` and `nbf` checks accept fractions too; `iat` ssegate does not read.)
fn numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Seconds;
    impl serde::de::Visitor<'_> for Seconds {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a NumericDate (seconds since the epoch)")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom("a negative NumericDate"))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u64, E> {
            // Up to 2^64, the first value that does not fit (NaN and infinities are outside).
            if (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                Ok(v.floor() as u64)
            } else {
                Err(E::custom("a NumericDate out of range"))
            }
        }
    }
    d.deserialize_any(Seconds)
}

/// Why a token was refused; the text is the one-line reason the client sees.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token's algorithm is not accepted")]
    Algorithm,
    #[error("the token's issuer is not accepted")]
    Issuer,
    #[error("the token's audience is not accepted")]
    Audience,
    #[error("the token lacks the `{0}` claim")]
    MissingClaim(String),
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's header marks `{0}` critical, an extension ssegate does not understand")]
    Critical(String),
}

/// RFC 7515 §4.1.11: a header parameter listed in `crit` must be understood, or the token
/// refused. ssegate understands no extension, so any `crit` refuses the token. (jsonwebtoken's
/// `Header` drops `crit`, so the header segment is read here.)
fn refuse_critical(token: &str) -> Result<(), TokenError> {
    use base64::Engine;
    let segment = token.split('.').next().unwrap_or("");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(segment).map_err(|_| TokenError::Malformed)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
    match header.get("crit") {
        None => Ok(()),
        Some(serde_json::Value::Array(names)) if !names.is_empty() => {
            let first = names.first().and_then(|n| n.as_str()).unwrap_or("?");
            Err(TokenError::Critical(first.to_owned()))
        }
        // Present but not a non-empty list of names: malformed (RFC 7515 §4.1.11).
        Some(_) => Err(TokenError::Malformed),
    }
}

/// Seconds since the Unix epoch.
fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read { path: path.display().to_string(), source })
}

fn invalid(path: &Path, reason: impl std::fmt::Display) -> KeyError {
    KeyError::Invalid { path: path.display().to_string(), reason: reason.to_string() }
}

impl JwtVerifier {
    pub fn load(settings: &JwtSettings) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        if let Some(path) = &settings.secret_file {
            let secret = read(path)?;
            let secret = secret.trim_ascii();
            if secret.len() < 32 {
                return Err(invalid(path, "an HS256 secret must be at least 32 bytes"));
            }
            keys.push(Key { kid: None, alg: Algorithm::HS256, key: DecodingKey::from_secret(secret) });
        }
        if let Some(path) = &settings.public_key_file {
            let pem = read(path)?;
            // The PEM's key type decides the algorithm.
            let key = DecodingKey::from_rsa_pem(&pem)
                .map(|k| (Algorithm::RS256, k))
                .or_else(|_| DecodingKey::from_ec_pem(&pem).map(|k| (Algorithm::ES256, k)))
                .or_else(|_| DecodingKey::from_ed_pem(&pem).map(|k| (Algorithm::EdDSA, k)))
                .map_err(|_| invalid(path, "not an RSA, EC (P-256) or Ed25519 public key in PEM"))?;
            keys.push(Key { kid: None, alg: key.0, key: key.1 });
        }
        if let Some(path) = &settings.jwks_file {
            let set: JwkSet = serde_json::from_slice(&read(path)?).map_err(|e| invalid(path, e))?;
            for jwk in &set.keys {
                let alg = match jwk.common.key_algorithm.map(|a| a.to_string().parse::<Algorithm>()) {
                    Some(Ok(alg)) => alg,
                    _ => match &jwk.algorithm {
                        jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                        jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                        jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
                        _ => return Err(invalid(path, "a key of an unsupported type")),
                    },
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(path, e))?;
                keys.push(Key { kid: jwk.common.key_id.clone(), alg, key });
            }
            if set.keys.is_empty() {
                return Err(invalid(path, "the JWKS holds no keys"));
            }
        }
        Ok(Self { keys, settings: settings.clone() })
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        refuse_critical(token)?;
        let candidates = self
            .keys
            .iter()
            .filter(|k| k.alg == header.alg && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid));
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.settings.leeway.as_secs();
        validation.validate_nbf = true;
        // A configured issuer or audience must be present, not only right when present.
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &self.settings.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.settings.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let mut outcome = Err(TokenError::Algorithm);
        for key in candidates {
            outcome =
                jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map(|d| d.claims).map_err(|e| {
                    match e.kind() {
                        ErrorKind::ExpiredSignature => TokenError::Expired,
                        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                        ErrorKind::InvalidSignature => TokenError::BadSignature,
                        ErrorKind::InvalidAlgorithm => TokenError::Algorithm,
                        ErrorKind::InvalidIssuer => TokenError::Issuer,
                        ErrorKind::InvalidAudience => TokenError::Audience,
                        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
                        _ => TokenError::Malformed,
                    }
                });
            // Another key may still fit (key rotation without `kid`): keep trying on a bad
            // signature only.
            if !matches!(outcome, Err(TokenError::BadSignature)) {
                break;
            }
        }
        // The leeway forgives a clock that runs ahead (`nbf`), not expiry: a stream admitted
        // with an expired token would be closed at once, and the client would loop.
        match outcome {
            Ok(claims) if claims.exp <= now_secs() => Err(TokenError::Expired),
            other => other,
        }
    }
}

/// A verifier whose key files are re-read when they change, so keys rotate without a restart.
/// A file that cannot be used keeps the previous keys in service (and is logged).
pub struct ReloadingVerifier {
    settings: JwtSettings,
    current: std::sync::RwLock<std::sync::Arc<JwtVerifier>>,
    modified: std::sync::Mutex<Vec<Option<std::time::SystemTime>>>,
}

impl ReloadingVerifier {
    pub fn load(settings: &JwtSettings) -> Result<std::sync::Arc<Self>, KeyError> {
        let verifier = JwtVerifier::load(settings)?;
        Ok(std::sync::Arc::new(Self {
            settings: settings.clone(),
            current: std::sync::RwLock::new(std::sync::Arc::new(verifier)),
            modified: std::sync::Mutex::new(Self::mtimes(settings)),
        }))
    }

    fn mtimes(settings: &JwtSettings) -> Vec<Option<std::time::SystemTime>> {
        [&settings.secret_file, &settings.public_key_file, &settings.jwks_file]
            .iter()
            .map(|p| p.as_deref().and_then(crate::reload::modified))
            .collect()
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let verifier = self.current.read().unwrap_or_else(|e| e.into_inner()).clone();
        verifier.verify(token)
    }

    /// Reloads the keys if a key file changed.
    pub fn refresh(&self) {
        let now = Self::mtimes(&self.settings);
        let mut seen = self.modified.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == now {
            return;
        }
        match JwtVerifier::load(&self.settings) {
            Ok(v) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(v);
                *seen = now;
                tracing::info!("JWT verification keys reloaded");
            }
            Err(e) => tracing::error!(error = %e, "JWT keys not reloaded; keeping the previous ones"),
        }
    }

    /// Checks the key files every `every` until `stop`, on a task of `tracker`.
    pub fn watch(self: &std::sync::Arc<Self>, every: Duration, stop: &CancellationToken, tracker: &TaskTracker) {
        let this = self.clone();
        crate::reload::every(every, stop, tracker, move || this.refresh());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> JwtVerifier {
        // A directory per call: tests run in parallel, and a file being rewritten reads short.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ssegate-jwt-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef").unwrap();
        let v = JwtVerifier::load(&JwtSettings { secret_file: Some(path), ..Default::default() }).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        v
    }

    #[test]
    fn short_secrets_are_refused_at_start() {
        let dir = std::env::temp_dir().join(format!("ssegate-jwt-short-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "too short").unwrap();
        let err = JwtVerifier::load(&JwtSettings { secret_file: Some(path), ..Default::default() });
        assert!(err.err().is_some_and(|e| e.to_string().ends_with("an HS256 secret must be at least 32 bytes")));
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    /// A token with this header and these claims, signed with the test secret.
    fn token(header: serde_json::Value, claims: serde_json::Value) -> String {
        use base64::Engine;
        let b64 = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let signing_input = format!("{}.{}", b64(&header), b64(&claims));
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET);
        let sig = jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, Algorithm::HS256).unwrap();
        format!("{signing_input}.{sig}")
    }

    fn hs256() -> serde_json::Value {
        serde_json::json!({"alg": "HS256", "typ": "JWT"})
    }

    #[test]
    fn a_token_expired_within_the_leeway_is_refused_and_nbf_keeps_its_leeway() {
        let v = verifier();
        let v = JwtVerifier { settings: JwtSettings { leeway: Duration::from_secs(30), ..v.settings.clone() }, ..v };
        let now = now_secs();
        let expired = token(hs256(), serde_json::json!({"sub": "a", "exp": now - 5}));
        assert!(matches!(v.verify(&expired), Err(TokenError::Expired)));
        let early = token(hs256(), serde_json::json!({"sub": "a", "exp": now + 60, "nbf": now + 5}));
        assert!(v.verify(&early).is_ok(), "a token from a clock 5 s ahead is accepted");
    }

    #[test]
    fn a_critical_header_extension_is_refused() {
        let v = verifier();
        let claims = serde_json::json!({"sub": "a", "exp": now_secs() + 60});
        assert!(v.verify(&token(hs256(), claims.clone())).is_ok());
        let crit = serde_json::json!({"alg": "HS256", "crit": ["exp-ext"], "exp-ext": 1});
        assert!(matches!(v.verify(&token(crit, claims.clone())), Err(TokenError::Critical(n)) if n == "exp-ext"));
        let empty = serde_json::json!({"alg": "HS256", "crit": []});
        assert!(matches!(v.verify(&token(empty, claims)), Err(TokenError::Malformed)));
    }

    #[test]
    fn a_configured_issuer_and_audience_must_be_present() {
        let v = verifier();
        let settings =
            JwtSettings { issuer: Some("https://app".into()), audience: Some("ssegate".into()), ..v.settings.clone() };
        let v = JwtVerifier { settings, ..v };
        let exp = now_secs() + 60;
        let ok = serde_json::json!({"sub": "a", "exp": exp, "iss": "https://app", "aud": "ssegate"});
        assert!(v.verify(&token(hs256(), ok)).is_ok());
        let no_iss = serde_json::json!({"sub": "a", "exp": exp, "aud": "ssegate"});
        assert!(matches!(v.verify(&token(hs256(), no_iss)), Err(TokenError::MissingClaim(c)) if c == "iss"));
        let no_aud = serde_json::json!({"sub": "a", "exp": exp, "iss": "https://app"});
        assert!(matches!(v.verify(&token(hs256(), no_aud)), Err(TokenError::MissingClaim(c)) if c == "aud"));
    }

    #[test]
    fn numeric_dates_with_a_fraction_are_accepted_and_rounded_down() {
        let v = verifier();
        let secs = now_secs();
        let now = secs as f64;
        // What a JavaScript issuer writes: `Date.now() / 1000`, with milliseconds.
        let js = serde_json::json!({"sub": "a", "exp": now + 600.25, "nbf": now - 1.5, "iat": now - 1.5});
        assert_eq!(v.verify(&token(hs256(), js)).map(|c| c.exp), Ok(secs + 600), "exp rounded down");
        // Rounded down, never up: a token expiring within the second is already expired.
        let ending = serde_json::json!({"sub": "a", "exp": now + 0.75});
        assert!(matches!(v.verify(&token(hs256(), ending)), Err(TokenError::Expired)));
        let premature = serde_json::json!({"sub": "a", "exp": now + 600.5, "nbf": now + 300.5});
        assert!(matches!(v.verify(&token(hs256(), premature)), Err(TokenError::NotYetValid)));
        for bad in [serde_json::json!(-1.5), serde_json::json!(1e300), serde_json::json!("1700000000")] {
            let claims = serde_json::json!({"sub": "a", "exp": bad});
            assert!(matches!(v.verify(&token(hs256(), claims)), Err(TokenError::Malformed)), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_tokens_are_refused_without_panicking(t in ".{0,300}", parts in "[A-Za-z0-9_=-]{0,80}\\.[A-Za-z0-9_=-]{0,80}\\.[A-Za-z0-9_=-]{0,80}") {
            let v = verifier();
            proptest::prop_assert!(v.verify(&t).is_err());
            proptest::prop_assert!(v.verify(&parts).is_err());
        }
    }
}
