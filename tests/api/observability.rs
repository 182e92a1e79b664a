//! Metrics, probes and traces: real work, then a scrape of `/metrics` that must have moved by
//! exactly the right amounts; readiness flips at the start of a drain; a publish carrying a
//! W3C `traceparent` is exported over OTLP as a child of the caller's span.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use ssegate::grpc::pb;
use tokio::{net::TcpListener, sync::Mutex, time::Instant};
use tonic::{Code, Request, Response, Status, metadata::MetadataValue};

use crate::helpers::{deadline, ev, http_request, spawn_app, spawn_process};

/// Scrapes `/metrics` into `series{labels} -> value`.
async fn scrape(admin: SocketAddr) -> HashMap<String, f64> {
    let (status, headers, body) = http_request(admin, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(k, v)| k == "content-type" && v.starts_with("application/openmetrics-text")));
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| panic!("no series {series} in the scrape"))
}

#[tokio::test]
async fn counters_and_gauges_move_by_exactly_the_work_done() {
    let app = spawn_app(&["--max-connections", "2"]).await;
    let before = scrape(app.admin).await;
    assert_eq!(get(&before, "ssegate_connections"), 0.0);

    let mut a = app.subscribe("user=a").await;
    let mut b = app.subscribe("user=b&topic=t").await;
    let (status, _, _) = http_request(app.http, "GET", "/v1/events?user=c", &[]).await;
    assert_eq!(status, 503);
    let (status, _, _) = http_request(app.http, "GET", "/v1/events?nobody=1", &[]).await;
    assert_eq!(status, 400);
    app.publish_users(&["a"], "", "1").await;
    app.publish_topic("t", "2").await;
    app.broadcast("3").await;
    let err = app
        .client
        .clone()
        .publish_group(pb::PublishGroupRequest { group: String::new(), event: Some(ev("", "x")), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(a.next_data(2).await, ["1", "3"]);
    assert_eq!(b.next_data(2).await, ["2", "3"]);
    app.wait_stats("4 deliveries", |s| s.events_delivered == 4).await;

    let m = scrape(app.admin).await;
    for (series, want) in [
        ("ssegate_connections", 2.0),
        ("ssegate_users", 2.0),
        ("ssegate_topics", 1.0),
        ("ssegate_connections_opened_total", 2.0),
        (r#"ssegate_connections_rejected_total{reason="max_connections"}"#, 1.0),
        (r#"ssegate_connections_rejected_total{reason="bad_request"}"#, 1.0),
        (r#"ssegate_events_published_total{target="user",outcome="ok"}"#, 1.0),
        (r#"ssegate_events_published_total{target="topic",outcome="ok"}"#, 1.0),
        (r#"ssegate_events_published_total{target="broadcast",outcome="ok"}"#, 1.0),
        (r#"ssegate_events_published_total{target="group",outcome="ok"}"#, 0.0),
        (r#"ssegate_events_published_total{target="group",outcome="invalid"}"#, 1.0),
        ("ssegate_events_delivered_total", 4.0),
        ("ssegate_events_dropped_total", 0.0),
        (r#"ssegate_grpc_requests_total{method="ssegate.v1.Publisher/Publish",code="OK"}"#, 1.0),
        (r#"ssegate_grpc_requests_total{method="ssegate.v1.Publisher/Broadcast",code="OK"}"#, 1.0),
        (r#"ssegate_grpc_requests_total{method="ssegate.v1.Publisher/PublishGroup",code="INVALID_ARGUMENT"}"#, 1.0),
        ("ssegate_delivery_latency_seconds_count", get(&m, "ssegate_delivery_latency_seconds_count")),
    ] {
        assert_eq!(get(&m, series), want, "{series}");
    }
    let writes = get(&m, "ssegate_delivery_latency_seconds_count");
    assert!((1.0..=4.0).contains(&writes), "one latency sample per write with an event: {writes}");
    assert!(get(&m, "process_resident_memory_bytes") > 0.0);
    assert!(get(&m, "process_open_fds") > 0.0);

    drop(a);
    app.wait_connections("a", 0).await;
    let m = scrape(app.admin).await;
    assert_eq!(get(&m, "ssegate_connections"), 1.0);
    assert_eq!(get(&m, r#"ssegate_connections_closed_total{reason="client_left"}"#), 1.0);
    app.client.clone().disconnect(pb::DisconnectRequest { user_id: "b".into(), reason: String::new() }).await.unwrap();
    let _ = b.until_end().await;
    app.wait_connections("b", 0).await;
    let m = scrape(app.admin).await;
    assert_eq!(get(&m, r#"ssegate_connections_closed_total{reason="disconnected"}"#), 1.0);
    assert_eq!(get(&m, "ssegate_connections"), 0.0);
}

#[tokio::test]
async fn readiness_turns_false_at_the_start_of_a_drain_while_still_serving() {
    let mut app = spawn_app(&["--shutdown-delay", "2s"]).await;
    let mut c = app.subscribe("user=a").await;
    assert_eq!(http_request(app.admin, "GET", "/readyz", &[]).await.0, 200);
    app.begin_stop();
    let end = deadline();
    loop {
        let (status, _, body) = http_request(app.admin, "GET", "/readyz", &[]).await;
        if status == 503 {
            assert_eq!(body.trim_end(), "not ready: draining");
            break;
        }
        assert!(Instant::now() < end, "readiness never turned false");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(http_request(app.admin, "GET", "/healthz", &[]).await.0, 200, "still alive");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.grpc)).unwrap().connect().await.unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, tonic_health::pb::health_check_response::ServingStatus::NotServing as i32);
    // Within the delay, everything still works: load balancers are being told to move away.
    app.publish_users(&["a"], "", "during the delay").await;
    assert_eq!(c.next_event().await.data, "during the delay");
    app.stop().await;
}

/// A stand-in OTLP collector: keeps every exported request.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.0.lock().await.push(req.into_inner());
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test]
async fn a_publish_with_traceparent_is_exported_over_otlp_as_a_child_of_the_callers_span() {
    let collector = Collector::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let endpoint = format!("http://{otlp}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "ssegate-under-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    let mut server = spawn_process(&[], &env).await;
    let grpc = server.grpc;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut client = pb::publisher_client::PublisherClient::connect(format!("http://{grpc}")).await.unwrap();
    let mut req = Request::new(pb::BroadcastRequest { event: Some(ev("", "traced")), ..Default::default() });
    let traceparent = format!("00-{trace_id}-{parent_id}-01");
    req.metadata_mut().insert("traceparent", MetadataValue::try_from(traceparent.as_str()).unwrap());
    client.broadcast(req).await.unwrap();

    // Wait for both spans of our trace: the call (child of the caller's span) and the publish.
    let end = deadline();
    let (call, publish, service) = loop {
        let spans: Vec<_> = {
            let got = collector.0.lock().await;
            got.iter()
                .flat_map(|r| r.resource_spans.iter())
                .flat_map(|rs| {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|kv| kv.key == "service.name")
                        .map(|kv| format!("{:?}", kv.value));
                    rs.scope_spans.iter().flat_map(|ss| ss.spans.iter()).map(move |s| (s.clone(), service.clone()))
                })
                .filter(|(s, _)| hex(&s.trace_id) == trace_id)
                .collect()
        };
        let call = spans.iter().find(|(s, _)| s.name == "ssegate.v1.Publisher/Broadcast").cloned();
        let publish = spans.iter().find(|(s, _)| s.name == "publish").cloned();
        if let (Some((call, service)), Some((publish, _))) = (call, publish) {
            break (call, publish, service);
        }
        assert!(Instant::now() < end, "spans of trace {trace_id} not exported; got {spans:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(hex(&call.parent_span_id), parent_id, "the call span continues the caller's trace");
    assert_eq!(publish.parent_span_id, call.span_id, "publish is a child of the call span");
    assert!(service.is_some_and(|s| s.contains("ssegate-under-test")), "OTEL_SERVICE_NAME is honoured");
    let _ = server.child.start_kill();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
