//! Telling clients apart by their address: the login throttle, the hashing cap and the
//! WebSocket hub's per-client limit count by the same keys.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The part of a client's address that the login throttle, the hashing cap and the WebSocket
/// connections per client count by: an IPv4 address, or an IPv6 address's /64 (one host can
/// pick any address in its /64, so counting whole addresses would give it as many turns as it
/// likes). An IPv4 client reaching
/// the server through NAT64 (`64:ff9b::/96`, the well-known prefix) counts as its IPv4
/// address, not as one /64 shared by every such client. Requests whose address is unknown
/// (dispatched on the bus without one) share one key.
///
/// ```
/// use helpdesk_api::client_key;
/// assert_eq!(client_key(Some("2001:db8:1:2::9".parse().unwrap())), "2001:db8:1:2::/64");
/// assert_eq!(client_key(Some("64:ff9b::c000:201".parse().unwrap())), "192.0.2.1");
/// ```
pub fn client_key(ip: Option<IpAddr>) -> String {
    match ip.map(unwrap_ip) {
        None => "unknown".to_owned(),
        Some(IpAddr::V4(v4)) => v4.to_string(),
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// The site an IPv6 client's /64 belongs to, its /48 (what one organisation or one customer
/// of a provider usually holds: one party can use thousands of /64s), or `None` for an IPv4 or
/// unknown address, whose [`client_key`] is the site already.
pub fn site_key(ip: Option<IpAddr>) -> Option<String> {
    match ip.map(unwrap_ip)? {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            Some(format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2]))
        }
    }
}

/// The IPv4 address inside an IPv4-mapped or NAT64 (`64:ff9b::/96`) address; others as given.
fn unwrap_ip(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) if is_nat64(&v6) => {
            let [.., a, b, c, d] = v6.octets();
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        }
        other => other,
    }
}

fn is_nat64(v6: &Ipv6Addr) -> bool {
    v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_its_site_the_48() {
        assert_eq!(client_key(ip("2001:db8:1:2::1")), "2001:db8:1:2::/64");
        assert_eq!(client_key(ip("2001:db8:1:2:ffff::9")), "2001:db8:1:2::/64");
        assert_eq!(site_key(ip("2001:db8:1:2::1")).unwrap(), "2001:db8:1::/48");
        assert_eq!(site_key(ip("2001:db8:1:ff::1")).unwrap(), "2001:db8:1::/48");
        assert_eq!(site_key(ip("192.0.2.1")), None);
        assert_eq!(site_key(None), None);
        assert_eq!(client_key(None), "unknown");
    }

    /// Behind NAT64 every IPv4 client arrives in one /64: each counts as its IPv4 address.
    #[test]
    fn an_ipv4_client_through_nat64_or_mapped_is_its_ipv4_address() {
        assert_eq!(client_key(ip("64:ff9b::c000:201")), "192.0.2.1");
        assert_eq!(client_key(ip("64:ff9b::c000:202")), "192.0.2.2");
        assert_eq!(client_key(ip("::ffff:192.0.2.1")), "192.0.2.1");
        assert_eq!(site_key(ip("64:ff9b::c000:201")), None);
        // The local-use NAT64 prefix (64:ff9b:1::/48) is an operator's choice: a /64 as usual.
        assert_eq!(client_key(ip("64:ff9b:1::c000:201")), "64:ff9b:1:0::/64");
    }
}
