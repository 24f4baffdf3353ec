//! Where webhooks may be sent.
//!
//! An org admin chooses the URL, and the server sends to it: without a
//! check, every tenant could make Tally POST into the operator's network
//! (loopback services, private ranges, the cloud metadata address) and read
//! the outcome from the delivery log. So by default a webhook may not reach
//! an address that is loopback, private, link-local, unique-local, shared
//! (carrier NAT), multicast, reserved or unspecified, IPv4 inside IPv6
//! included.
//!
//! The check runs twice: when the webhook is set (a clear refusal, on what
//! the name resolves to then), and at every delivery on the addresses the
//! client will connect to: the resolver below hands the HTTP client only
//! addresses it has checked, so a name that resolves elsewhere later (DNS
//! rebinding) is refused too. URLs with an IP address are checked directly.
//!
//! An operator allows named hosts or ranges (`--webhook-allow`), for
//! receivers inside their own network.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// How long the check at set time waits for a name to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Targets allowed despite their address.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    hosts: Vec<String>,
    nets: Vec<(IpAddr, u8)>,
}

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub host: String,
    pub addr: IpAddr,
    pub kind: &'static str,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = if self.host == self.addr.to_string() {
            format!("{}", self.addr)
        } else {
            format!("{} resolves to {}", self.host, self.addr)
        };
        write!(
            f,
            "{on}, {}: webhooks are not sent to loopback, private, link-local, \
             unique-local, shared, multicast, reserved or metadata addresses \
             (the operator may allow a host or range with --webhook-allow)",
            self.kind
        )
    }
}

impl std::error::Error for Refused {}

impl TargetPolicy {
    /// From the operator's list: host names (`hooks.internal`), addresses
    /// (`10.1.2.3`, `::1`) and ranges (`10.0.0.0/8`, `fc00::/7`).
    pub fn parse(entries: &[String]) -> Result<TargetPolicy, String> {
        let mut policy = TargetPolicy::default();
        for entry in entries {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let (addr, prefix) = match entry.split_once('/') {
                Some((a, p)) => {
                    let addr: IpAddr = a
                        .parse()
                        .map_err(|_| format!("{entry:?}: {a:?} is not an IP address"))?;
                    let max = if addr.is_ipv4() { 32 } else { 128 };
                    let prefix = p
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= max)
                        .ok_or_else(|| format!("{entry:?}: the prefix must be 0 to {max}"))?;
                    (Some(addr), prefix)
                }
                None => match entry.parse::<IpAddr>() {
                    Ok(addr) => (Some(addr), if addr.is_ipv4() { 32 } else { 128 }),
                    Err(_) => (None, 0),
                },
            };
            match addr {
                Some(addr) => {
                    // An IPv4 address inside IPv6 is checked as IPv4: kept
                    // as such, one address; a range of them is refused
                    // rather than guessed at.
                    let v4 = canonical(addr);
                    if v4 != addr {
                        if prefix != 128 {
                            return Err(format!(
                                "{entry:?}: IPv4 inside IPv6 is allowed one address at a \
                                 time; give the IPv4 range instead"
                            ));
                        }
                        policy.nets.push((v4, 32));
                    } else {
                        policy.nets.push((addr, prefix));
                    }
                }
                None => {
                    let valid = entry.len() <= 253
                        && entry
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
                    if !valid {
                        return Err(format!(
                            "{entry:?} is not a host name, an IP address or a range"
                        ));
                    }
                    policy.hosts.push(entry.to_ascii_lowercase());
                }
            }
        }
        Ok(policy)
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    fn allows_addr(&self, addr: IpAddr) -> bool {
        self.nets
            .iter()
            .any(|(net, prefix)| in_net(canonical(addr), *net, *prefix))
    }

    /// Whether `host`, at `addr`, may receive webhooks.
    pub fn check(&self, host: &str, addr: IpAddr) -> Result<(), Refused> {
        if self.allows_host(host) || self.allows_addr(addr) {
            return Ok(());
        }
        match forbidden(addr) {
            None => Ok(()),
            Some(kind) => Err(Refused {
                host: host.to_owned(),
                addr,
                kind,
            }),
        }
    }

    /// The check when a webhook is set: the URL's address, or every address
    /// its host resolves to now. A name that does not resolve (yet) passes:
    /// each delivery checks again.
    pub async fn check_url(&self, url: &str) -> Result<(), Refused> {
        let Ok(parsed) = Url::parse(url) else {
            return Ok(()); // the command refuses malformed URLs
        };
        match parsed.host() {
            None => Ok(()),
            Some(url::Host::Ipv4(a)) => self.check(&a.to_string(), IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => self.check(&a.to_string(), IpAddr::V6(a)),
            Some(url::Host::Domain(name)) => {
                if self.allows_host(name) {
                    return Ok(());
                }
                let port = parsed.port_or_known_default().unwrap_or(443);
                let resolved =
                    tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port)))
                        .await;
                let Ok(Ok(addrs)) = resolved else {
                    return Ok(());
                };
                for a in addrs {
                    self.check(name, a.ip())?;
                }
                Ok(())
            }
        }
    }

    /// The check before a delivery of a URL with an IP address (names are
    /// checked by [`GuardedResolver`] as they resolve).
    pub fn check_literal(&self, url: &Url) -> Result<(), Refused> {
        match url.host() {
            Some(url::Host::Ipv4(a)) => self.check(&a.to_string(), IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => self.check(&a.to_string(), IpAddr::V6(a)),
            _ => Ok(()),
        }
    }
}

/// The HTTP client's resolver: it hands over a name's addresses only when
/// every one of them is allowed, so the client connects to checked
/// addresses only.
#[derive(Debug)]
pub struct GuardedResolver {
    pub policy: Arc<TargetPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for a in &addrs {
                policy.check(&host, a.ip())?;
            }
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// IPv4 inside IPv6 (mapped, compatible, NAT64, 6to4) as IPv4.
fn canonical(addr: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = addr else { return addr };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let embedded_low = || {
        let o = v6.octets();
        Ipv4Addr::new(o[12], o[13], o[14], o[15])
    };
    // ::a.b.c.d (deprecated "compatible"), but not :: and ::1.
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        return IpAddr::V4(embedded_low());
    }
    // 64:ff9b::/96, the well-known NAT64 prefix.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return IpAddr::V4(embedded_low());
    }
    // 2002::/16, 6to4: the IPv4 address in bits 16 to 48.
    if s[0] == 0x2002 {
        let o = v6.octets();
        return IpAddr::V4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    addr
}

/// Whether `addr` is in `net`/`prefix`; never for a prefix longer than
/// the address.
fn in_net(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let mask = |bits: u32| {
        bits.checked_sub(u32::from(prefix))
            .map(|shift| u128::MAX.checked_shl(shift).unwrap_or(0))
    };
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => mask(32).is_some_and(|m| {
            let m = m as u32;
            u32::from(a) & m == u32::from(n) & m
        }),
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            mask(128).is_some_and(|m| u128::from(a) & m == u128::from(n) & m)
        }
        _ => false,
    }
}

/// What kind of address `addr` is, when webhooks may not reach it.
pub fn forbidden(addr: IpAddr) -> Option<&'static str> {
    match canonical(addr) {
        IpAddr::V4(a) => forbidden_v4(a),
        IpAddr::V6(a) => forbidden_v6(a),
    }
}

fn forbidden_v4(a: Ipv4Addr) -> Option<&'static str> {
    let v4 = |s: &str, p: u8| in_net(IpAddr::V4(a), s.parse().expect("a literal"), p);
    if a == Ipv4Addr::new(169, 254, 169, 254) {
        return Some("the cloud metadata address");
    }
    Some(if a.is_loopback() {
        "a loopback address"
    } else if a.is_private() {
        "a private address"
    } else if a.is_link_local() {
        "a link-local address"
    } else if v4("100.64.0.0", 10) {
        "a shared (carrier NAT) address"
    } else if a.is_multicast() {
        "a multicast address"
    } else if a.is_broadcast() || v4("240.0.0.0", 4) {
        "a reserved address"
    } else if v4("0.0.0.0", 8) {
        "an unspecified address"
    } else if v4("192.0.0.0", 24) || v4("198.18.0.0", 15) {
        "a reserved address"
    } else if v4("192.0.2.0", 24) || v4("198.51.100.0", 24) || v4("203.0.113.0", 24) {
        "a documentation address"
    } else {
        return None;
    })
}

fn forbidden_v6(a: Ipv6Addr) -> Option<&'static str> {
    let v6 = |s: &str, p: u8| in_net(IpAddr::V6(a), s.parse().expect("a literal"), p);
    if a == "fd00:ec2::254".parse::<Ipv6Addr>().expect("a literal") {
        return Some("the cloud metadata address");
    }
    Some(if a.is_loopback() {
        "a loopback address"
    } else if a.is_unspecified() {
        "an unspecified address"
    } else if v6("fe80::", 10) {
        "a link-local address"
    } else if v6("fc00::", 7) {
        "a unique-local address"
    } else if v6("fec0::", 10) {
        "a site-local address"
    } else if a.is_multicast() {
        "a multicast address"
    } else if v6("64:ff9b:1::", 48) {
        // RFC 8215: a site's own NAT64, which may reach its private ranges.
        "a NAT64 local-use address"
    } else if v6("2001:db8::", 32) {
        "a documentation address"
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_operators_network_is_refused_and_the_internet_is_not() {
        for (addr, kind) in [
            ("127.0.0.1", "a loopback address"),
            ("127.8.9.10", "a loopback address"),
            ("10.0.0.1", "a private address"),
            ("10.255.255.255", "a private address"),
            ("172.16.0.1", "a private address"),
            ("172.31.255.254", "a private address"),
            ("192.168.1.1", "a private address"),
            ("169.254.169.254", "the cloud metadata address"),
            ("169.254.0.7", "a link-local address"),
            ("100.64.0.1", "a shared (carrier NAT) address"),
            ("224.0.0.1", "a multicast address"),
            ("255.255.255.255", "a reserved address"),
            ("0.0.0.0", "an unspecified address"),
            ("::1", "a loopback address"),
            ("::", "an unspecified address"),
            ("fe80::1", "a link-local address"),
            ("fc00::1", "a unique-local address"),
            ("fd12:3456::1", "a unique-local address"),
            ("fd00:ec2::254", "the cloud metadata address"),
            ("ff02::1", "a multicast address"),
            // IPv4 inside IPv6.
            ("::ffff:127.0.0.1", "a loopback address"),
            ("::ffff:10.1.2.3", "a private address"),
            ("::ffff:169.254.169.254", "the cloud metadata address"),
            ("64:ff9b::a00:1", "a private address"),
            ("2002:7f00:1::", "a loopback address"),
            ("64:ff9b:1::a00:1", "a NAT64 local-use address"),
            ("192.0.2.1", "a documentation address"),
            ("198.51.100.7", "a documentation address"),
            ("203.0.113.9", "a documentation address"),
            ("2001:db8::1", "a documentation address"),
        ] {
            assert_eq!(forbidden(ip(addr)), Some(kind), "{addr}");
        }
        for addr in [
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.1",
            "100.128.0.1",
            "169.253.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(forbidden(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn the_operator_allows_hosts_and_ranges() {
        let p = TargetPolicy::parse(&[
            "127.0.0.1".into(),
            "10.20.0.0/16".into(),
            "fc00::/7".into(),
            "Hooks.Internal".into(),
        ])
        .unwrap();
        assert!(p.check("127.0.0.1", ip("127.0.0.1")).is_ok());
        assert!(p.check("x", ip("127.0.0.2")).is_err());
        assert!(p.check("x", ip("::ffff:127.0.0.1")).is_ok());
        assert!(p.check("x", ip("10.20.99.1")).is_ok());
        assert!(p.check("x", ip("10.21.0.1")).is_err());
        assert!(p.check("x", ip("fd00::5")).is_ok());
        assert!(p.check("hooks.internal", ip("192.168.0.9")).is_ok());
        assert!(p.check("hooks.internal.", ip("192.168.0.9")).is_ok());
        let refused = p.check("other.internal", ip("192.168.0.9")).unwrap_err();
        assert_eq!(refused.kind, "a private address");
        assert!(
            refused
                .to_string()
                .starts_with("other.internal resolves to 192.168.0.9, a private address"),
            "{refused}"
        );
        // An IPv4 address written as IPv6 allows that address only; a range
        // so written is refused (the IPv4 range says it plainly).
        let mapped = TargetPolicy::parse(&["::ffff:127.0.0.1".into()]).unwrap();
        assert!(mapped.check("x", ip("127.0.0.1")).is_ok());
        assert!(mapped.check("x", ip("::ffff:127.0.0.1")).is_ok());
        assert!(mapped.check("x", ip("169.254.169.254")).is_err());
        assert!(mapped.check("x", ip("10.0.0.1")).is_err());
        for bad in ["::ffff:0:0/96", "64:ff9b::/96", "2002:7f00::/24"] {
            assert!(TargetPolicy::parse(&[bad.into()]).is_err(), "{bad}");
        }
        for bad in ["10.0.0.0/33", "::/129", "x/8", "a b", "host:80"] {
            assert!(TargetPolicy::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn urls_are_checked_by_address_and_by_what_names_resolve_to() {
        let p = TargetPolicy::default();
        for url in [
            "http://127.0.0.1:9/x",
            "http://[::1]/x",
            "http://2130706433/x",
            "http://0x7f.1/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://localhost:8080/x",
        ] {
            assert!(p.check_url(url).await.is_err(), "{url}");
        }
        // Does not resolve here: passes now, checked at each delivery.
        assert!(p.check_url("https://hooks.acme.test/t").await.is_ok());
        assert!(p.check_url("https://93.184.215.14/t").await.is_ok());
        let allowed = TargetPolicy::parse(&["localhost".into()]).unwrap();
        assert!(allowed.check_url("http://localhost:8080/x").await.is_ok());
        assert!(allowed.check_url("http://127.0.0.1:8080/x").await.is_err());
    }
}
