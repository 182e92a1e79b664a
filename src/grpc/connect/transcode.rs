//! The body encodings of Connect unary calls (`application/json`, `application/proto`) and the
//! table of the publisher's unary methods, each with the conversion of its request body to a
//! protobuf message and of its protobuf answer back to a body.

use http::{HeaderMap, HeaderValue, header};
use prost::Message;
use serde::{Serialize, de::DeserializeOwned};

use super::error::ConnectError;
use crate::grpc::pb;

/// The body encodings of Connect unary calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Codec {
    Json,
    Proto,
}

impl Codec {
    /// `application/json` (with an optional `charset=utf-8`) or `application/proto`.
    pub(super) fn from_headers(headers: &HeaderMap) -> Result<Self, ConnectError> {
        let raw = headers.get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let Some(raw) = raw else { return Err(ConnectError::MediaType(String::new())) };
        let mut parts = raw.split(';').map(str::trim);
        let essence = parts.next().unwrap_or_default().to_ascii_lowercase();
        let params: Vec<String> =
            parts.filter(|p| !p.is_empty()).map(|p| p.to_ascii_lowercase().replace(' ', "")).collect();
        match essence.as_str() {
            "application/json" if params.iter().all(|p| p == "charset=utf-8" || p == "charset=\"utf-8\"") => {
                Ok(Codec::Json)
            }
            "application/proto" if params.is_empty() => Ok(Codec::Proto),
            _ => Err(ConnectError::MediaType(raw)),
        }
    }

    pub(super) fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Codec::Json => "application/json",
            Codec::Proto => "application/proto",
        })
    }
}

/// One unary method: its name and the transcoding of its request and response.
pub(super) struct Procedure {
    pub(super) name: &'static str,
    /// The request body (in the codec) as a protobuf message.
    pub(super) request: fn(&[u8], Codec) -> Result<Vec<u8>, ConnectError>,
    /// The protobuf response message as a body in the codec.
    pub(super) response: fn(&[u8], Codec) -> Result<Vec<u8>, ConnectError>,
}

const fn procedure<Req, Resp>(name: &'static str) -> Procedure
where
    Req: Message + Default + DeserializeOwned,
    Resp: Message + Default + Serialize,
{
    Procedure { name, request: decode_request::<Req>, response: encode_response::<Resp> }
}

/// Every unary method of the proto; `STREAMING` are the others.
pub(super) const PROCEDURES: [Procedure; 8] = [
    procedure::<pb::PublishRequest, pb::PublishResponse>("Publish"),
    procedure::<pb::PublishGroupRequest, pb::PublishResponse>("PublishGroup"),
    procedure::<pb::PublishTopicRequest, pb::PublishResponse>("PublishTopic"),
    procedure::<pb::BroadcastRequest, pb::PublishResponse>("Broadcast"),
    procedure::<pb::DisconnectRequest, pb::DisconnectResponse>("Disconnect"),
    procedure::<pb::PresenceRequest, pb::PresenceResponse>("Presence"),
    procedure::<pb::StatsRequest, pb::StatsResponse>("Stats"),
    procedure::<pb::HistoryRequest, pb::HistoryResponse>("History"),
];

/// The streaming methods, which HTTP/JSON does not serve: Connect's streaming protocols frame
/// messages in the body (`application/connect+json`), which this layer does not speak.
pub(super) const STREAMING: [&str; 2] = ["PublishStream", "WatchPresence"];

/// Parses a request body, so a malformed one is refused here with `invalid_argument` (a gRPC
/// server would call a bad protobuf `internal`), and encodes it as protobuf. An empty JSON body
/// is the empty message, as an empty protobuf body is.
fn decode_request<M: Message + Default + DeserializeOwned>(body: &[u8], codec: Codec) -> Result<Vec<u8>, ConnectError> {
    let msg = match codec {
        Codec::Json if body.iter().all(u8::is_ascii_whitespace) => M::default(),
        Codec::Json => serde_json::from_slice::<M>(body).map_err(ConnectError::Json)?,
        Codec::Proto => M::decode(body).map_err(ConnectError::Proto)?,
    };
    Ok(msg.encode_to_vec())
}

fn encode_response<M: Message + Default + Serialize>(proto: &[u8], codec: Codec) -> Result<Vec<u8>, ConnectError> {
    match codec {
        Codec::Proto => Ok(proto.to_vec()),
        Codec::Json => {
            let msg = M::decode(proto).map_err(|e| ConnectError::Internal(format!("decoding the answer: {e}")))?;
            serde_json::to_vec(&msg).map_err(|e| ConnectError::Internal(format!("encoding the answer: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn every_method_of_the_proto_is_a_procedure_or_a_streaming_method() {
        let mut ours: Vec<String> =
            PROCEDURES.iter().map(|p| p.name).chain(STREAMING).map(|n| format!("ssegate.v1.Publisher/{n}")).collect();
        ours.sort();
        let mut proto: Vec<String> = pb::METHODS.iter().map(|m| m.to_string()).collect();
        proto.sort();
        assert_eq!(ours, proto, "a method added to the proto needs a Connect procedure or a STREAMING entry");
    }

    #[test]
    fn content_types() {
        let codec = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            Codec::from_headers(&h).ok()
        };
        assert_eq!(codec("application/json"), Some(Codec::Json));
        assert_eq!(codec("Application/JSON; charset=UTF-8"), Some(Codec::Json));
        assert_eq!(codec("application/proto"), Some(Codec::Proto));
        assert_eq!(codec("application/json; charset=latin1"), None);
        assert_eq!(codec("text/plain"), None);
        assert_eq!(codec("application/connect+json"), None);
        assert_eq!(Codec::from_headers(&HeaderMap::new()).ok(), None);
    }

    #[test]
    fn json_requests_use_the_proto3_mapping() {
        let proto = decode_request::<pb::PublishRequest>(
            br#"{"userIds":["a"],"event":{"name":"n","data":"d"},"idempotency_key":"k"}"#,
            Codec::Json,
        )
        .unwrap();
        let req = pb::PublishRequest::decode(proto.as_slice()).unwrap();
        assert_eq!(
            (req.user_ids, req.event.unwrap().data, req.idempotency_key),
            (vec!["a".into()], "d".into(), "k".into())
        );
        let err = decode_request::<pb::PublishRequest>(br#"{"userIdz":[]}"#, Codec::Json).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("unknown field `userIdz`"), "{err}");
        assert!(decode_request::<pb::StatsRequest>(b"", Codec::Json).unwrap().is_empty());
        let resp =
            pb::PublishResponse { event_id: "1-2".into(), recipients: Some(3), ..Default::default() }.encode_to_vec();
        let json = encode_response::<pb::PublishResponse>(&resp, Codec::Json).unwrap();
        assert_eq!(String::from_utf8(json).unwrap(), r#"{"eventId":"1-2","recipients":"3","partitionEventIds":[]}"#);
    }
}
