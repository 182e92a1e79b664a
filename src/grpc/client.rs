//! The gRPC client side: `ssegate publish` sends one event through the public API. Every error
//! is one line saying what is wrong and, where it can tell, how to fix it: a URL it cannot use,
//! a server that cannot be reached, a port that answers plain HTTP rather than gRPC (the SSE or
//! admin port), or the server's gRPC status.

use std::{
    error::Error as StdError,
    sync::{Arc, OnceLock},
};

use anyhow::anyhow;
use tower::ServiceExt;

use crate::{config::PublishArgs, grpc::pb};

/// The URL `ssegate publish` connects to: `--grpc-url` itself if it says `http://` or
/// `https://`; a bare `host:port` with `https://` if a TLS option is given, `http://`
/// otherwise. Refused, saying what to write instead: another scheme, and TLS options with an
/// `http://` URL (they would be ignored).
pub fn endpoint_url(args: &PublishArgs) -> anyhow::Result<String> {
    let url = args.grpc_url.trim();
    let tls_flag = if args.tls_ca_file.is_some() {
        Some("--tls-ca-file")
    } else if args.tls_client_cert_file.is_some() {
        Some("--tls-client-cert-file")
    } else {
        None
    };
    match url.split_once("://") {
        None if tls_flag.is_some() => Ok(format!("https://{url}")),
        None => Ok(format!("http://{url}")),
        Some(("https", _)) => Ok(url.to_owned()),
        Some(("http", rest)) => match tls_flag {
            Some(flag) => Err(anyhow!("{flag} is for TLS, but --grpc-url {url} is plaintext: use https://{rest}")),
            None => Ok(url.to_owned()),
        },
        Some((scheme, _)) => Err(anyhow!(
            "--grpc-url {url}: {scheme}:// is not a gRPC scheme; use http://host:port, https://host:port (TLS) or \
             host:port"
        )),
    }
}

/// An error and its sources on one line, each part once (errors often repeat their source's
/// text in their own).
fn chain(e: &(dyn StdError + 'static)) -> String {
    chain_from(&e.to_string(), e.source())
}

/// `first`, then the text of `source` and its own sources, on one line, each part once.
fn chain_from(first: &str, mut source: Option<&(dyn StdError + 'static)>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut add = |text: String| {
        for part in text.split(": ") {
            if !parts.iter().any(|p| p == part) {
                parts.push(part.to_owned());
            }
        }
    };
    add(first.to_owned());
    while let Some(err) = source {
        add(err.to_string());
        source = err.source();
    }
    parts.join(": ").replace(['\r', '\n'], " ")
}

/// How to fix a failure to reach or talk to the server at `url`, from its description.
fn hint(url: &str, authority: &str, detail: &str, ca_given: bool) -> String {
    if detail.contains("InvalidContentType") {
        "; the server does not speak TLS on this port: use http://".to_owned()
    } else if detail.contains("UnknownIssuer") && !ca_given {
        "; give the CA that signed the server's certificate with --tls-ca-file".to_owned()
    } else if url.starts_with("http://") && detail.contains("frame with invalid size") {
        "; the server may be serving TLS on this port: use https:// (and --tls-ca-file)".to_owned()
    } else if detail.contains("onnection refused") {
        format!("; is the server running, with --grpc-addr {authority}?")
    } else if url.starts_with("http://") {
        format!(
            "; is {authority} the server's gRPC port (its --grpc-addr, default 50051), without TLS (else https://)?"
        )
    } else {
        format!("; is {authority} the server's gRPC port (its --grpc-addr, default 50051)?")
    }
}

/// A response that is not gRPC's: its HTTP status and content type.
#[derive(Debug)]
struct NotGrpc {
    status: http::StatusCode,
    content_type: Option<String>,
}

impl NotGrpc {
    /// `Some` if `resp` is not a gRPC response (status 200 and an `application/grpc` type).
    fn of<B>(resp: &http::Response<B>) -> Option<Self> {
        let content_type = resp.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let grpc = content_type.is_some_and(|t| t.starts_with("application/grpc"));
        (resp.status() != http::StatusCode::OK || !grpc)
            .then(|| Self { status: resp.status(), content_type: content_type.map(str::to_owned) })
    }

    /// What to tell the user: `authority` answered this, and where the gRPC port is.
    fn explain(&self, authority: &str) -> String {
        let content_type = match (&self.content_type, self.status) {
            (Some(t), http::StatusCode::OK) => format!(" ({t})"),
            _ => String::new(),
        };
        format!(
            "{authority} answered HTTP {}{content_type}, not gRPC: is this ssegate's SSE (HTTP) or admin port? \
             The gRPC port is the server's --grpc-addr (default 50051)",
            self.status
        )
    }
}

/// Sends one event with `data` as the `publish` flags say, and returns its id.
pub async fn publish(args: PublishArgs, data: String) -> anyhow::Result<String> {
    use pb::publisher_client::PublisherClient;

    let url = endpoint_url(&args)?;
    let event = Some(pb::Event { name: args.event, data });
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(url.clone()).map_err(|e| anyhow!("--grpc-url {url}: {}", chain(&e)))?;
    let authority = endpoint.uri().authority().map_or_else(|| url.clone(), ToString::to_string);
    if url.starts_with("https://") {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| anyhow!("{flag} {}: {e}", path.display()))
        };
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &args.tls_ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read("--tls-ca-file", ca)?));
        }
        if let (Some(cert), Some(key)) = (&args.tls_client_cert_file, &args.tls_client_key_file) {
            let identity =
                Identity::from_pem(read("--tls-client-cert-file", cert)?, read("--tls-client-key-file", key)?);
            tls = tls.identity(identity);
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| anyhow!("TLS settings: {}", chain(&e)))?;
    }
    let ca_given = args.tls_ca_file.is_some();
    let channel = endpoint.connect().await.map_err(|e| {
        let detail = chain(&e);
        anyhow!("cannot connect to {url}: {detail}{}", hint(&url, &authority, &detail, ca_given))
    })?;
    // Remember a response that is not gRPC's: tonic reports it as a decoding error (the SSE
    // port's 404 page read as a gRPC frame), which says nothing about the wrong port.
    let not_grpc = Arc::new(OnceLock::new());
    let seen = not_grpc.clone();
    let channel = channel.map_response(move |resp: http::Response<tonic::body::Body>| {
        if let Some(answer) = NotGrpc::of(&resp) {
            let _ = seen.set(answer);
        }
        resp
    });
    let auth = match &args.api_key {
        Some(key) => Some(
            tonic::metadata::MetadataValue::try_from(format!("Bearer {key}"))
                .map_err(|_| anyhow!("--api-key: not a valid header value (visible ASCII only)"))?,
        ),
        None => None,
    };
    let mut client = PublisherClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(v) = &auth {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    });
    let key = args.idempotency_key.unwrap_or_default();
    let retain = if args.clear_retained {
        Some(pb::Retain { ttl_seconds: 0, clear: true })
    } else if args.retain {
        let ttl = args.retain_ttl.map_or(0, |d| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX));
        Some(pb::Retain { ttl_seconds: ttl, clear: false })
    } else {
        None
    };
    let resp = if !args.user.is_empty() {
        client.publish(pb::PublishRequest { user_ids: args.user, event, idempotency_key: key, retain }).await
    } else if let Some(group) = args.group {
        client.publish_group(pb::PublishGroupRequest { group, event, idempotency_key: key, retain }).await
    } else if let Some(topic) = args.topic {
        client.publish_topic(pb::PublishTopicRequest { topic, event, idempotency_key: key, retain }).await
    } else {
        client.broadcast(pb::BroadcastRequest { event, idempotency_key: key, retain }).await
    };
    let resp = resp
        .map_err(|s| match not_grpc.get() {
            Some(answer) => anyhow!(answer.explain(&authority)),
            // A transport failure: its detail is in the sources ("transport error" alone says
            // nothing).
            None if s.source().is_some() => {
                let detail = chain_from(s.message(), s.source());
                anyhow!("{:?}: {detail}{}", s.code(), hint(&url, &authority, &detail, ca_given))
            }
            None => anyhow!("{:?}: {}", s.code(), s.message().replace(['\r', '\n'], " ")),
        })?
        .into_inner();
    Ok(resp.event_id)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::{Cli, Command};

    fn url(flags: &[&str]) -> anyhow::Result<String> {
        let argv = [&["ssegate", "publish", "--broadcast", "--data", "x"], flags].concat();
        let Command::Publish(args) = Cli::try_parse_from(argv).unwrap().command else { panic!("not publish") };
        endpoint_url(&args)
    }

    #[test]
    fn a_bare_address_gets_the_scheme_its_tls_options_imply() {
        assert_eq!(url(&[]).unwrap(), "http://127.0.0.1:50051");
        assert_eq!(url(&["--grpc-url", "10.0.0.1:50051"]).unwrap(), "http://10.0.0.1:50051");
        assert_eq!(url(&["--grpc-addr", "10.0.0.1:50051"]).unwrap(), "http://10.0.0.1:50051");
        assert_eq!(url(&["--grpc-url", "h:1", "--tls-ca-file", "ca.pem"]).unwrap(), "https://h:1");
        let mtls = ["--tls-client-cert-file", "c.pem", "--tls-client-key-file", "c.key"];
        assert_eq!(url(&[&["--grpc-url", "h:1"], &mtls[..]].concat()).unwrap(), "https://h:1");
        assert_eq!(url(&["--grpc-url", "https://h:1"]).unwrap(), "https://h:1");
    }

    #[test]
    fn unusable_urls_are_refused_saying_what_to_write() {
        let e = url(&["--grpc-url", "http://h:1", "--tls-ca-file", "ca.pem"]).unwrap_err().to_string();
        assert!(e.contains("use https://h:1"), "{e}");
        let e = url(&["--grpc-url", "grpc://h:1"]).unwrap_err().to_string();
        assert!(e.contains("grpc://") && e.contains("http://host:port"), "{e}");
    }
}
