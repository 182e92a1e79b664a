//! Publisher API keys: bearer tokens in gRPC metadata, from a file (one per line, so a
//! Kubernetes Secret can be mounted) and/or an environment variable (comma-separated), several
//! at once for rotation. The file is re-read when it changes, so a key is revoked by removing
//! its line, without a restart.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    #[error("cannot read the API key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the API key file {0} holds no key")]
    Empty(String),
    #[error("API keys must be at least 16 characters (one in {0} is shorter)")]
    TooShort(String),
}

/// The accepted keys, reloadable.
pub struct ApiKeys {
    /// What the keys are for, in log lines (`publisher API keys`, `console tokens`).
    what: &'static str,
    file: Option<PathBuf>,
    from_env: Vec<String>,
    current: RwLock<Arc<Vec<String>>>,
    modified: RwLock<Option<SystemTime>>,
}

/// Shortest key accepted: shorter ones are guessable.
const MIN_KEY_LEN: usize = 16;

fn parse(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
}

impl ApiKeys {
    pub fn load(file: Option<PathBuf>, env_list: Option<&str>) -> Result<Self, ApiKeyError> {
        Self::load_for("publisher API keys", file, env_list)
    }

    /// Keys for `what` (named in log lines): the same rules and reloading as publisher keys.
    /// The admin console's token file uses it.
    pub fn load_for(what: &'static str, file: Option<PathBuf>, env_list: Option<&str>) -> Result<Self, ApiKeyError> {
        let from_env: Vec<String> =
            env_list.unwrap_or("").split(',').map(str::trim).filter(|k| !k.is_empty()).map(str::to_owned).collect();
        let keys = Self { what, file, from_env, current: RwLock::new(Arc::default()), modified: RwLock::new(None) };
        keys.reload()?;
        Ok(keys)
    }

    /// At start, strict: a file that cannot be read, holds a key too short to be one, or (with
    /// no key in the environment either) holds none stops the server.
    fn reload(&self) -> Result<(), ApiKeyError> {
        let Some(path) = &self.file else {
            return self.install(self.from_env.clone(), None);
        };
        let name = || path.display().to_string();
        let err = |source| ApiKeyError::Read { path: name(), source };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).map_err(err)?;
        let mut keys = parse(&std::fs::read_to_string(path).map_err(err)?);
        if keys.iter().any(|k| k.len() < MIN_KEY_LEN) {
            return Err(ApiKeyError::TooShort(name()));
        }
        if keys.is_empty() && self.from_env.is_empty() {
            return Err(ApiKeyError::Empty(name()));
        }
        keys.extend(self.from_env.iter().cloned());
        self.install(keys, Some(modified))
    }

    fn install(&self, keys: Vec<String>, modified: Option<SystemTime>) -> Result<(), ApiKeyError> {
        if keys.iter().any(|k| k.len() < MIN_KEY_LEN) {
            return Err(ApiKeyError::TooShort("SSEGATE_PUBLISHER_API_KEYS".into()));
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        *self.modified.write().unwrap_or_else(|e| e.into_inner()) = modified;
        Ok(())
    }

    /// Re-reads the file if it changed since the last read. Fails closed: the keys are then
    /// exactly the valid keys the file holds now (plus those of the environment). Emptying the
    /// file revokes every key; a line too short to be a key is not one; a file that cannot be
    /// read holds none. Each of these is logged as an error.
    pub fn refresh(&self) {
        let Some(path) = &self.file else { return };
        let modified = crate::reload::modified(path);
        if modified == *self.modified.read().unwrap_or_else(|e| e.into_inner()) {
            return;
        }
        let file = path.display().to_string();
        let mut keys = match std::fs::read_to_string(path) {
            Ok(text) => parse(&text),
            Err(e) => {
                tracing::error!(%file, error = %e, keys = self.what, "key file unreadable: its keys are revoked");
                Vec::new()
            }
        };
        let before = keys.len();
        keys.retain(|k| k.len() >= MIN_KEY_LEN);
        if keys.len() < before {
            tracing::error!(%file, ignored = before - keys.len(), min_len = MIN_KEY_LEN, keys = self.what, "keys too short to be keys: ignored");
        }
        let from_file = keys.len();
        keys.extend(self.from_env.iter().cloned());
        if keys.is_empty() {
            tracing::error!(%file, keys = self.what, "no valid key left: every call is refused until one is added");
        }
        if self.install(keys, modified).is_ok() {
            tracing::info!(%file, from_file, total = self.len(), keys = self.what, "keys reloaded");
        }
    }

    pub fn len(&self) -> usize {
        self.current.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn accepts(&self, presented: &str) -> bool {
        let keys = self.current.read().unwrap_or_else(|e| e.into_inner()).clone();
        // Compare with every key, each in constant time, so timing reveals neither which key
        // nor how much of it matched.
        keys.iter().fold(false, |found, k| found | constant_time_eq(k.as_bytes(), presented.as_bytes()))
    }

    /// Re-reads the file every `every` until `stop`, on a task of `tracker`.
    pub fn watch(self: Arc<Self>, every: Duration, stop: &CancellationToken, tracker: &TaskTracker) {
        if self.file.is_none() {
            return;
        }
        crate::reload::every(every, stop, tracker, move || self.refresh());
    }
}

/// Hand-written (a few lines) rather than a crate: equal-length inputs are compared without an
/// early exit; the length itself is not secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How publishers are authenticated on the gRPC port.
#[derive(Clone)]
pub enum PublisherAuth {
    /// `authorization: Bearer <key>` must carry one of these keys.
    ApiKeys(Arc<ApiKeys>),
    /// The TLS layer already required a client certificate signed by the configured CA.
    ClientCertificate,
    /// Anyone who can reach the port may publish (`--insecure-open-publish`).
    Open,
    /// Nothing configured: every call is refused with a message saying what to set.
    Disabled,
}

/// Why a publisher was refused; the message is shown to it as is.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishDenied {
    #[error(
        "publishing is disabled: configure --publisher-api-keys-file (or SSEGATE_PUBLISHER_API_KEYS), \
         --grpc-client-ca-file, or --insecure-open-publish for development"
    )]
    Disabled,
    #[error("no publisher API key is configured (the key file holds no valid key); publishing is refused")]
    NoKeys,
    #[error("the authorization header is malformed: expected `authorization: Bearer <key>`")]
    Malformed,
    #[error("an API key is required: send `authorization: Bearer <key>`")]
    Missing,
    #[error("the API key is not valid")]
    Invalid,
}

impl PublisherAuth {
    /// Decides on a publisher call from its `authorization` header (absent: `None`). The gRPC
    /// edge runs it before every `Publisher` call and maps a refusal to `UNAUTHENTICATED`.
    pub fn authorize(&self, authorization: Option<&[u8]>) -> Result<(), PublishDenied> {
        let keys = match self {
            PublisherAuth::Open | PublisherAuth::ClientCertificate => return Ok(()),
            PublisherAuth::Disabled => return Err(PublishDenied::Disabled),
            PublisherAuth::ApiKeys(keys) => keys,
        };
        if keys.is_empty() {
            return Err(PublishDenied::NoKeys);
        }
        let Some(header) = authorization else { return Err(PublishDenied::Missing) };
        let key = std::str::from_utf8(header)
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .ok_or(PublishDenied::Malformed)?;
        if keys.accepts(key) { Ok(()) } else { Err(PublishDenied::Invalid) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_refused_saying_whether_the_key_is_missing_malformed_or_wrong() {
        let keys = Arc::new(ApiKeys::load(None, Some("key-one-0123456789abcdef")).unwrap());
        let auth = PublisherAuth::ApiKeys(keys);
        assert_eq!(auth.authorize(Some(b"Bearer key-one-0123456789abcdef")), Ok(()));
        assert_eq!(auth.authorize(Some(b"bearer  key-one-0123456789abcdef ")), Ok(()));
        assert_eq!(auth.authorize(None), Err(PublishDenied::Missing));
        assert_eq!(auth.authorize(Some(b"key-one-0123456789abcdef")), Err(PublishDenied::Malformed));
        assert_eq!(auth.authorize(Some(b"Basic a2V5")), Err(PublishDenied::Malformed));
        assert_eq!(auth.authorize(Some(b"Bearer nope-0123456789abcdef")), Err(PublishDenied::Invalid));
        assert_eq!(PublisherAuth::Disabled.authorize(None), Err(PublishDenied::Disabled));
        assert_eq!(PublisherAuth::Open.authorize(None), Ok(()));
    }

    #[test]
    fn keys_from_file_and_env_and_rotation() {
        let dir = std::env::temp_dir().join(format!("ssegate-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(&file, "# publishers\nkey-one-0123456789abcdef\n\nkey-two-0123456789abcdef\n").unwrap();
        let keys = ApiKeys::load(Some(file.clone()), Some("env-key-0123456789abcdef")).unwrap();
        assert_eq!(keys.len(), 3);
        assert!(keys.accepts("key-two-0123456789abcdef") && keys.accepts("env-key-0123456789abcdef"));
        assert!(!keys.accepts("key-two-0123456789abcdeF") && !keys.accepts(""));
        // Revoke key one; the file's mtime must change for the reload to notice.
        std::fs::write(&file, "key-two-0123456789abcdef\n").unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options().write(true).open(&file).unwrap().set_modified(later).unwrap();
        keys.refresh();
        assert!(!keys.accepts("key-one-0123456789abcdef"));
        assert!(keys.accepts("key-two-0123456789abcdef"));
        assert!(ApiKeys::load(None, Some("short")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Sets the file's content and a modification time the reload will notice.
    fn rewrite(file: &std::path::Path, content: &str, secs: u64) {
        std::fs::write(file, content).unwrap();
        let t = SystemTime::now() + Duration::from_secs(secs);
        std::fs::File::options().write(true).open(file).unwrap().set_modified(t).unwrap();
    }

    #[test]
    fn rotation_fails_closed_emptied_short_or_missing_files_revoke_their_keys() {
        let dir = std::env::temp_dir().join(format!("ssegate-keys-closed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        let key = "key-one-0123456789abcdef";
        std::fs::write(&file, format!("{key}\n")).unwrap();
        let keys = ApiKeys::load(Some(file.clone()), None).unwrap();
        assert!(keys.accepts(key));
        rewrite(&file, "", 5);
        keys.refresh();
        assert!(!keys.accepts(key) && keys.is_empty(), "emptying the file revokes every key");
        rewrite(&file, &format!("{key}\n"), 10);
        keys.refresh();
        assert!(keys.accepts(key));
        rewrite(&file, "short\n", 15);
        keys.refresh();
        assert!(!keys.accepts(key) && !keys.accepts("short"), "a too-short line is no key, and replaces the old ones");
        rewrite(&file, &format!("{key}\n"), 20);
        keys.refresh();
        std::fs::remove_file(&file).unwrap();
        keys.refresh();
        assert!(!keys.accepts(key), "a file that is gone holds no key");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
