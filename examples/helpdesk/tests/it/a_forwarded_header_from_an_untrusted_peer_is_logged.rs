//! A request that carries `X-Forwarded-For` from a peer `HELPDESK_TRUSTED_PROXIES` does not
//! list is logged, once, at warn: the header is ignored, so a load balancer left off the list
//! makes every client behind it one address, which the login throttles then count as one
//! client (50 failures by anyone block every login), without a word before.

use crate::support::*;
use std::io::{Read, Write};

/// A login from `addr`'s peer (127.0.0.1) through a raw connection, with `X-Forwarded-For`
/// when given; the status line of its answer.
fn login(addr: std::net::SocketAddr, forwarded_for: Option<&str>) -> String {
    let body = r#"{"email":"nobody@example.com","password":"not the password"}"#;
    let forwarded = forwarded_for.map_or(String::new(), |ip| format!("X-Forwarded-For: {ip}\r\n"));
    let mut tcp = std::net::TcpStream::connect(addr).expect("the server accepts");
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    write!(
        tcp,
        "POST /auth/login HTTP/1.1\r\nHost: helpdesk\r\nContent-Type: application/json\r\n\
         {forwarded}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer)
        .expect("an answer within 20 s");
    answer.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn a_forwarded_header_from_an_untrusted_peer_is_logged_once() {
    let (_child, lines, addr) = serving(&[], &[]);
    assert!(login(addr, None).starts_with("HTTP/1.1 401"));
    assert!(login(addr, Some("203.0.113.9")).starts_with("HTTP/1.1 401"));
    let warned: serde_json::Value =
        serde_json::from_str(&line_with(&lines, "carries X-Forwarded-For")).unwrap();
    assert_eq!(warned["level"], "WARN", "{warned}");
    let message = warned["fields"]["message"].as_str().unwrap();
    assert!(
        message.contains("127.0.0.1") && message.contains("HELPDESK_TRUSTED_PROXIES"),
        "{message}"
    );
}
