//! A request that carries `X-Forwarded-For` from a peer `HELPDESK_TRUSTED_PROXIES` does not
//! list is logged at warn, once for that peer: the header is ignored, so a load balancer left
//! off the list makes every client behind it one address, which the login throttles then count
//! as one client (50 failures by anyone block every login), without a word before.

use crate::support::*;
use std::io::{Read, Write};

/// A login from `addr`'s peer (127.0.0.1) through a raw connection, to `/auth/login?n={n}`,
/// with `X-Forwarded-For` when given; the status line of its answer.
fn login(addr: std::net::SocketAddr, n: u32, forwarded_for: Option<&str>) -> String {
    let body = r#"{"email":"nobody@example.com","password":"not the password"}"#;
    let forwarded = forwarded_for.map_or(String::new(), |ip| format!("X-Forwarded-For: {ip}\r\n"));
    let mut tcp = std::net::TcpStream::connect(addr).expect("the server accepts");
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    write!(
        tcp,
        "POST /auth/login?n={n} HTTP/1.1\r\nHost: helpdesk\r\nContent-Type: application/json\r\n\
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
    assert!(login(addr, 1, None).starts_with("HTTP/1.1 401"));
    assert!(login(addr, 2, Some("203.0.113.9")).starts_with("HTTP/1.1 401"));
    assert!(login(addr, 3, Some("198.51.100.4")).starts_with("HTTP/1.1 401"));
    // Every line up to the last request's access line: the warning came once.
    let mut seen = Vec::new();
    loop {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the last request's access line");
        let last = line.contains("/auth/login?n=3") && line.contains("finished processing");
        seen.push(line);
        if last {
            break;
        }
    }
    let warnings: Vec<&String> = seen
        .iter()
        .filter(|l| l.contains("carries X-Forwarded-For"))
        .collect();
    assert_eq!(warnings.len(), 1, "{seen:#?}");
    let warned: serde_json::Value = serde_json::from_str(warnings[0]).unwrap();
    assert_eq!(warned["level"], "WARN", "{warned}");
    let message = warned["fields"]["message"].as_str().unwrap();
    assert!(
        message.contains("127.0.0.1") && message.contains("HELPDESK_TRUSTED_PROXIES"),
        "{message}"
    );
}
