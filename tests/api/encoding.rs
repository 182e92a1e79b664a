//! What arrives is exactly what was sent, and no payload can forge fields or events.

use ssegate::event_stream::parse::Item;

use crate::helpers::spawn_app;

#[tokio::test]
async fn multi_line_payloads_arrive_intact_with_line_breaks_as_lf() {
    let app = spawn_app(&[]).await;
    let mut c = app.subscribe("user=u").await;
    let cases = [
        ("line1\nline2\nline3", "line1\nline2\nline3"),
        ("crlf\r\nsecond", "crlf\nsecond"),
        ("cr\rsecond", "cr\nsecond"),
        ("\n\nleading and trailing\n\n", "\n\nleading and trailing\n\n"),
        ("", ""),
        ("  spaces kept  ", "  spaces kept  "),
        (":not a comment", ":not a comment"),
    ];
    for (sent, _) in &cases {
        app.publish_users(&["u"], "", sent).await;
    }
    for (sent, expected) in &cases {
        assert_eq!(&c.next_event().await.data, expected, "sent {sent:?}");
    }
}

#[tokio::test]
async fn payloads_cannot_forge_fields_or_extra_events() {
    let app = spawn_app(&[]).await;
    let mut c = app.subscribe("user=u").await;
    let attack = "innocent\n\nevent: admin\ndata: forged\nid: 999999\nretry: 1\n\n: comment\r\n\r\ndata: x";
    let resp = app.publish_users(&["u"], "", attack).await;
    app.publish_users(&["u"], "", "next").await;
    let mut items = Vec::new();
    while items.iter().filter(|i| matches!(i, Item::Event(_))).count() < 2 {
        items.push(c.next_item().await.expect("stream open"));
    }
    let events: Vec<_> = items
        .iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some(e.clone()),
            _ => None,
        })
        .collect();
    assert!(!items.iter().any(|i| matches!(i, Item::Retry(1))), "no forged retry field: {items:?}");
    assert_eq!(events[0].event_type, "message");
    assert_eq!(events[0].data, attack.replace("\r\n", "\n"));
    assert_eq!(events[0].last_event_id, resp.event_id, "no forged id");
    assert_eq!(events[1].data, "next", "no forged extra event in between");
}

#[tokio::test]
async fn unicode_and_named_events_arrive_exactly() {
    let app = spawn_app(&[]).await;
    let mut c = app.subscribe("user=u").await;
    let text = "héllo wörld ✓ 用户 😀 \u{2028} \u{feff} \u{0}";
    app.publish_users(&["u"], "chat.message", text).await;
    app.publish_users(&["u"], "message", "explicit default").await;
    let ev = c.next_event().await;
    assert_eq!((ev.event_type.as_str(), ev.data.as_str()), ("chat.message", text));
    let ev = c.next_event().await;
    assert_eq!((ev.event_type.as_str(), ev.data.as_str()), ("message", "explicit default"));
}

#[tokio::test]
async fn large_events_up_to_the_limit_arrive_whole() {
    let app = spawn_app(&["--max-event-bytes", "200000"]).await;
    let mut c = app.subscribe("user=u").await;
    let big: String = (0..199_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    app.publish_users(&["u"], "", &big).await;
    assert_eq!(c.next_event().await.data, big);
}
