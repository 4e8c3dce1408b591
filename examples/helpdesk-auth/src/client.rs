//! Telling clients apart by their address.

use std::net::IpAddr;

/// The part of a client's address that the login throttle and the hashing cap count by: an
/// IPv4 address, or an IPv6 address's /64 (one host can pick any address in its /64, so
/// counting whole addresses would give it as many turns as it likes). Requests whose address
/// is unknown (dispatched on the bus without one) share one key.
pub(crate) fn client_key(ip: Option<IpAddr>) -> String {
    match ip.map(|ip| ip.to_canonical()) {
        None => "unknown".to_owned(),
        Some(IpAddr::V4(v4)) => v4.to_string(),
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}
