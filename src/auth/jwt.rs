//! JWT verification for subscribers: HS256 with a shared secret, or RS256 / ES256 / EdDSA with
//! a PEM public key or a JWKS file. `exp` and `sub` are required; `nbf`, and `iss` / `aud` when
//! configured, are checked, with a small leeway for clock skew. `alg: none` and any algorithm
//! we hold no key for are refused.

use std::{path::Path, time::Duration};

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
    pub exp: u64,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub topics: Vec<String>,
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
        let candidates = self
            .keys
            .iter()
            .filter(|k| k.alg == header.alg && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid));
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.settings.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &self.settings.issuer {
            validation.set_issuer(&[iss]);
        }
        match &self.settings.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
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
        outcome
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

    /// Checks the key files every `every` until the process ends.
    pub fn watch(self: &std::sync::Arc<Self>, every: Duration) {
        let this = self.clone();
        crate::reload::every(every, move || this.refresh());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> JwtVerifier {
        let dir = std::env::temp_dir().join(format!("ssegate-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef").unwrap();
        JwtVerifier::load(&JwtSettings { secret_file: Some(path), ..Default::default() }).unwrap()
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

    proptest::proptest! {
        #[test]
        fn arbitrary_tokens_are_refused_without_panicking(t in ".{0,300}", parts in "[A-Za-z0-9_=-]{0,80}\\.[A-Za-z0-9_=-]{0,80}\\.[A-Za-z0-9_=-]{0,80}") {
            let v = verifier();
            proptest::prop_assert!(v.verify(&t).is_err());
            proptest::prop_assert!(v.verify(&parts).is_err());
        }
    }
}
